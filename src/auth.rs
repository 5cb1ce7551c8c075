//! Who may do what: the tokens file (`KV_TOKENS_FILE`), its validation, the check a handler asks
//! before it touches a collection, and the reload of the file on SIGHUP.
//!
//! The file holds the SHA-256 of each token, never the token, so reading it grants nothing. A
//! presented token is hashed and looked up in a `HashMap` keyed by the 32-byte digest: how long the
//! lookup takes depends on the digest, not on how much of a real token a client has guessed. Tokens
//! are never logged; logs name the entry (`"name"`) instead.
//!
//! The tokens in force sit in an `RwLock<Arc<Tokens>>`. A request clones the `Arc` of its own token
//! and lets go of the lock; a reload parses and validates the whole file before it swaps, so no
//! request sees half a file and a broken file never replaces a good one. Without a tokens file
//! access is open, as before tokens existed, and the check is a single branch.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, PoisonError, RwLock};
use std::thread;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::Error;

/// Bytes in a SHA-256 digest.
const DIGEST_BYTES: usize = 32;
/// Permission bits for group and others; a tokens file with any of them set gets a warning.
const GROUP_OTHER_MODE_BITS: u32 = 0o077;
/// Random bytes in a token from `kv token new`: 256 bits, twice the 128 that make guessing hopeless.
pub const NEW_TOKEN_RANDOM_BYTES: usize = 32;
/// Prefix of tokens from `kv token new`, so people and secret scanners can tell what the string is.
pub const NEW_TOKEN_PREFIX: &str = "kv_";

/// What a request asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    /// Read objects of a collection.
    Read,
    /// Write (put, delete) objects of a collection; includes `Read`.
    Write,
    /// Everything else that is not about one collection's objects (backup, restore, ...).
    Admin,
    /// Read the metrics.
    Metrics,
}

/// Why a request is refused; becomes `Error::Unauthorized` (401) or `Error::Forbidden` (403).
#[derive(Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No token, a malformed `Authorization` header, or a token nobody issued.
    Unauthorized,
    /// A known token without the right; the sentence names the right and the collection.
    Forbidden(String),
}

impl From<AuthError> for Error {
    fn from(e: AuthError) -> Error {
        match e {
            AuthError::Unauthorized => Error::Unauthorized,
            AuthError::Forbidden(message) => Error::Forbidden {
                message,
                index: None,
            },
        }
    }
}

/// Who is asking: one entry of the tokens file, or anyone while access is open.
#[derive(Clone, Debug)]
pub struct Principal(Option<Arc<Token>>);

impl Principal {
    /// The token's `name` for the access log; `None` while access is open.
    pub fn name(&self) -> Option<&str> {
        self.0.as_ref().map(|token| token.name.as_str())
    }

    /// Whether this principal has `right`; for `Read` and `Write`, on `collection`, or, when the
    /// request names no single collection (`None`, the list of collections), on at least one.
    pub fn allows(&self, right: Right, collection: Option<&str>) -> bool {
        self.0
            .as_ref()
            .is_none_or(|token| token.allows(right, collection))
    }

    /// Whether this principal may read `collection`; for filtering a list of collections.
    pub fn can_read(&self, collection: &str) -> bool {
        self.allows(Right::Read, Some(collection))
    }

    /// Whether this principal may read every collection (admin, `"*"`, or open access), so that
    /// lists need no filtering.
    pub fn can_read_all(&self) -> bool {
        self.0.as_ref().is_none_or(|token| {
            token.admin
                || token
                    .grants
                    .iter()
                    .any(|(pattern, _)| *pattern == Pattern::All)
        })
    }

    /// `Forbidden` unless this principal has `right` (see `allows`); the sentence says what is missing.
    pub fn require(&self, right: Right, collection: Option<&str>) -> Result<(), AuthError> {
        if self.allows(right, collection) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(refusal(right, collection)))
        }
    }
}

/// The access check every handler asks, and the tokens behind it; shared by all workers.
#[derive(Debug)]
pub struct Auth {
    /// `None`: no tokens file, access is open.
    file: Option<PathBuf>,
    tokens: RwLock<Arc<Tokens>>,
}

impl Auth {
    /// Open access: every request is allowed, as without `KV_TOKENS_FILE`.
    pub fn open() -> Auth {
        Auth {
            file: None,
            tokens: RwLock::new(Arc::new(Tokens::default())),
        }
    }

    /// Tokens from `file`; an error if it is missing or invalid. Warns if group or others may read it.
    pub fn from_file(file: &Path) -> Result<Auth, String> {
        Ok(Auth {
            tokens: RwLock::new(Arc::new(read(file)?)),
            file: Some(file.to_path_buf()),
        })
    }

    /// As the settings say: open without a tokens file, else `from_file`; logs which.
    pub fn from_config(config: &Config) -> Result<Auth, String> {
        let Some(file) = &config.tokens_file else {
            log::info!("access is open to every client (no KV_TOKENS_FILE)");
            return Ok(Auth::open());
        };
        let auth = Auth::from_file(file)?;
        log::info!(
            "access needs a bearer token: {} token(s) from {} (SIGHUP re-reads it)",
            auth.current().count(),
            file.display()
        );
        Ok(auth)
    }

    /// Re-reads the tokens file and swaps it in only if it is valid; on error the tokens in force
    /// stay and the error is logged. Returns how many tokens are in force.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(file) = &self.file else {
            log::info!("no tokens file to re-read (no KV_TOKENS_FILE); access stays open");
            return Ok(0);
        };
        match read(file) {
            Ok(tokens) => {
                let count = tokens.count();
                *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tokens);
                log::info!("reloaded {}: {count} token(s)", file.display());
                Ok(count)
            }
            Err(e) => {
                log::error!(
                    "{e}; the {} token(s) loaded before stay in force",
                    self.current().count()
                );
                Err(e)
            }
        }
    }

    /// Who presents this `Authorization` header value; `Unauthorized` if it is missing, malformed
    /// or names no known token (open access: anyone).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        if self.file.is_none() {
            return Ok(Principal(None));
        }
        let token = authorization
            .and_then(bearer)
            .ok_or(AuthError::Unauthorized)?;
        let digest = sha256(token);
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        match tokens.by_digest.get(&digest) {
            Some(token) => Ok(Principal(Some(Arc::clone(token)))),
            None => Err(AuthError::Unauthorized),
        }
    }

    /// `authenticate`, then `Forbidden` unless the principal has `right` (see `Principal::allows`).
    /// The routing table authenticates once and checks each right with `Principal::require`;
    /// this one-call form is for the tests.
    #[cfg(test)]
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        right: Right,
        collection: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let principal = self.authenticate(authorization)?;
        principal.require(right, collection)?;
        Ok(principal)
    }

    /// Whether `principal`'s token is still in force, unchanged, after any reload since it was
    /// authenticated; for requests that outlive a reload (event streams), so that a revoked
    /// token stops receiving changes.
    pub fn is_current(&self, principal: &Principal) -> bool {
        let Some(token) = &principal.0 else {
            return self.file.is_none();
        };
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        tokens
            .by_digest
            .get(&token.digest)
            .is_some_and(|current| Arc::ptr_eq(current, token) || **current == **token)
    }

    fn current(&self) -> Arc<Tokens> {
        Arc::clone(&self.tokens.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Makes SIGHUP re-read the tokens file instead of stopping kv.
///
/// Call it before any other thread starts: it blocks SIGHUP in the calling thread, every thread
/// started later inherits that mask, and one thread of its own takes the signal with `sigwait`.
/// Blocking is what overrides `ctrlc`, whose `termination` feature installs the same stop handler
/// for SIGHUP as for SIGINT and SIGTERM: a blocked signal never runs a handler. Installing another
/// handler would not do (signal-hook, for one, chains to the handler it replaces, i.e. to the stop).
/// The reload itself then runs on an ordinary thread, free of async-signal-safety limits.
pub fn reload_on_sighup(auth: &Arc<Auth>) -> Result<(), String> {
    // Checked, not only documented, because a thread started earlier would take SIGHUP and stop kv.
    if let Ok(threads) = std::fs::read_dir("/proc/self/task") {
        if threads.count() > 1 {
            return Err("SIGHUP must be blocked before any other thread starts".into());
        }
    }
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set that sigaddset then changes; both only write to it.
    let set = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGHUP);
        set.assume_init()
    };
    // SAFETY: changes only this thread's signal mask; the set is initialised, the old mask unwanted.
    let failed = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut()) };
    if failed != 0 {
        return Err(format!(
            "cannot block SIGHUP: {}",
            io::Error::from_raw_os_error(failed)
        ));
    }
    let auth = Arc::clone(auth);
    thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            loop {
                let mut signal = 0;
                // SAFETY: waits for a signal of an initialised set and writes its number to `signal`.
                let failed = unsafe { libc::sigwait(&set, &mut signal) };
                if failed != 0 {
                    let e = io::Error::from_raw_os_error(failed);
                    log::error!("waiting for SIGHUP failed ({e}); SIGHUP no longer reloads");
                    return;
                }
                log::info!("SIGHUP: re-reading the tokens file");
                // reload logs the outcome, and an error keeps the tokens in force.
                let _ = auth.reload();
            }
        })
        .map_err(|e| format!("cannot start the SIGHUP thread: {e}"))?;
    Ok(())
}

/// The hex SHA-256 of a token, as the tokens file's `"sha256"` holds it.
pub fn sha256_hex(token: &str) -> String {
    hex(&sha256(token))
}

/// A new random token: `kv_` and 64 hex digits from the operating system's random source.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; NEW_TOKEN_RANDOM_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| format!("cannot read the OS random source: {e}"))?;
    Ok(format!("{NEW_TOKEN_PREFIX}{}", hex(&bytes)))
}

/// Refuses a token that could not travel in an `Authorization: Bearer` header.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if !is_token(token) {
        return Err(
            "a token is printable ASCII without spaces, as an Authorization header needs".into(),
        );
    }
    Ok(())
}

/// Refuses a name that would be ambiguous in a log line.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a token's name must not be empty".into());
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "a token's name must not contain control characters: {name:?}"
        ));
    }
    Ok(())
}

/// The validated contents of one tokens file.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; DIGEST_BYTES], Arc<Token>>,
}

impl Tokens {
    /// Reads and validates a tokens file; the error is one line naming the file and the problem.
    pub fn load(file: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read tokens file {}: {e}", file.display()))?;
        Tokens::parse(&text).map_err(|e| format!("tokens file {}: {e}", file.display()))
    }

    /// How many tokens there are.
    pub fn count(&self) -> usize {
        self.by_digest.len()
    }

    fn parse(text: &str) -> Result<Tokens, String> {
        let file: File = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut by_digest = HashMap::with_capacity(file.tokens.len());
        let mut names = HashSet::with_capacity(file.tokens.len());
        for (index, entry) in file.tokens.into_iter().enumerate() {
            check_name(&entry.name).map_err(|e| format!("tokens[{index}]: {e}"))?;
            let at = format!("tokens[{index}] ({:?})", entry.name);
            let digest = parse_digest(&entry.sha256)
                .ok_or_else(|| format!("{at}: \"sha256\" must be 64 hex digits"))?;
            let grants = entry
                .collections
                .into_iter()
                .map(|(pattern, access)| Ok((Pattern::parse(&pattern)?, access)))
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| format!("{at}: {e}"))?;
            if !names.insert(entry.name.clone()) {
                return Err(format!("{at}: another token has the same name"));
            }
            let token = Token {
                digest,
                name: entry.name,
                admin: entry.admin,
                metrics: entry.metrics,
                grants,
            };
            if by_digest.insert(digest, Arc::new(token)).is_some() {
                return Err(format!("{at}: another token has the same sha256"));
            }
        }
        Ok(Tokens { by_digest })
    }
}

/// One entry of the file.
#[derive(Debug, PartialEq, Eq)]
struct Token {
    /// Also the key it is found under; kept to find it again after a reload.
    digest: [u8; DIGEST_BYTES],
    name: String,
    admin: bool,
    metrics: bool,
    grants: Vec<(Pattern, Access)>,
}

impl Token {
    fn allows(&self, right: Right, collection: Option<&str>) -> bool {
        if self.admin {
            return true;
        }
        let needed = match right {
            Right::Admin => return false,
            Right::Metrics => return self.metrics,
            Right::Read => Access::Read,
            Right::Write => Access::Write,
        };
        match collection {
            Some(collection) => self.access(collection).is_some_and(|a| a >= needed),
            None => self.grants.iter().any(|&(_, a)| a >= needed),
        }
    }

    /// The strongest access any matching pattern grants.
    fn access(&self, collection: &str) -> Option<Access> {
        self.grants
            .iter()
            .filter(|(pattern, _)| pattern.matches(collection))
            .map(|&(_, access)| access)
            .max()
    }
}

/// What a pattern grants on the collections it matches; `Write` includes `Read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Access {
    Read,
    Write,
}

/// A key of `"collections"`: an exact name, a prefix ending in `*`, or `*` for every collection.
#[derive(Debug, PartialEq, Eq)]
enum Pattern {
    All,
    Prefix(String),
    Exact(String),
}

impl Pattern {
    fn parse(pattern: &str) -> Result<Pattern, String> {
        if pattern.is_empty() {
            return Err("a collection pattern must not be empty".into());
        }
        if pattern.chars().any(char::is_control) {
            return Err(format!(
                "collection pattern {pattern:?} contains a control character"
            ));
        }
        // A '*' inside a pattern would read as a glob that kv does not do, so it is refused.
        match pattern.find('*') {
            None => Ok(Pattern::Exact(pattern.to_string())),
            Some(0) if pattern.len() == 1 => Ok(Pattern::All),
            Some(star) if star == pattern.len() - 1 => Ok(Pattern::Prefix(pattern[..star].into())),
            Some(_) => Err(format!(
                "collection pattern {pattern:?}: '*' may only come last"
            )),
        }
    }

    fn matches(&self, collection: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Prefix(prefix) => collection.starts_with(prefix.as_str()),
            Pattern::Exact(name) => collection == name,
        }
    }
}

/// The file as written; `deny_unknown_fields` so a misspelt right is an error, not a silent no.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    sha256: String,
    #[serde(default, deserialize_with = "grants")]
    collections: Vec<(String, Access)>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    metrics: bool,
}

/// `"collections"` in file order, refusing a pattern given twice (a map would keep one silently).
fn grants<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, Access)>, D::Error> {
    struct Grants;
    impl<'de> Visitor<'de> for Grants {
        type Value = Vec<(String, Access)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(r#"an object of collection patterns, like {"app-*": "write"}"#)
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut grants: Vec<(String, Access)> = Vec::new();
            while let Some((pattern, access)) = map.next_entry::<String, Access>()? {
                if grants.iter().any(|(p, _)| *p == pattern) {
                    return Err(serde::de::Error::custom(format!(
                        "collection pattern {pattern:?} appears twice"
                    )));
                }
                grants.push((pattern, access));
            }
            Ok(grants)
        }
    }
    d.deserialize_map(Grants)
}

/// Loads a tokens file and warns if group or others may read it (the hashes are not secret, but
/// the names and rights tell an attacker which token to go after).
fn read(file: &Path) -> Result<Tokens, String> {
    let tokens = Tokens::load(file)?;
    if let Some(mode) = loose_mode(file) {
        log::warn!(
            "tokens file {} may be read by group or others (mode {mode:04o}); chmod 600 it",
            file.display()
        );
    }
    Ok(tokens)
}

/// The permission bits of `file` if group or others have any access to it.
fn loose_mode(file: &Path) -> Option<u32> {
    let mode = std::fs::metadata(file).ok()?.permissions().mode() & 0o7777;
    (mode & GROUP_OTHER_MODE_BITS != 0).then_some(mode)
}

/// The token of an `Authorization: Bearer <token>` value: scheme in any case, one space, a token.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && is_token(token)).then_some(token)
}

/// Printable ASCII without spaces: what a bearer token can be (and tiny_http can carry).
fn is_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

fn sha256(token: &str) -> [u8; DIGEST_BYTES] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_digest(hex: &str) -> Option<[u8; DIGEST_BYTES]> {
    if hex.len() != 2 * DIGEST_BYTES || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut digest = [0u8; DIGEST_BYTES];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 403 sentence: what the token may not do.
fn refusal(right: Right, collection: Option<&str>) -> String {
    let verb = match right {
        Right::Admin => return "this token has no admin right".into(),
        Right::Metrics => return "this token may not read the metrics".into(),
        Right::Read => "read",
        Right::Write => "write",
    };
    match collection {
        Some(collection) => format!("this token may not {verb} collection {collection:?}"),
        None => format!("this token may not {verb} any collection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const WEB: &str = "web-secret";
    const OPS: &str = "ops-secret";
    const PROM: &str = "prom-secret";
    const NOBODY: &str = "nobody-secret";

    fn file_text(entries: &[serde_json::Value]) -> String {
        serde_json::json!({ "tokens": entries }).to_string()
    }

    fn example() -> String {
        file_text(&[
            serde_json::json!({"name": "web", "sha256": sha256_hex(WEB),
                "collections": {"app-*": "write", "config": "read", "app-frozen": "read"}}),
            serde_json::json!({"name": "ops", "sha256": sha256_hex(OPS), "admin": true}),
            serde_json::json!({"name": "prom", "sha256": sha256_hex(PROM), "metrics": true}),
            serde_json::json!({"name": "nobody", "sha256": sha256_hex(NOBODY)}),
        ])
    }

    fn write_file(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("tokens.json");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn auth_from(text: &str) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), text);
        let auth = Auth::from_file(&path).unwrap();
        (dir, auth)
    }

    fn bearer_of(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn check(auth: &Auth, token: &str, right: Right, collection: Option<&str>) -> bool {
        match auth.authorize(Some(&bearer_of(token)), right, collection) {
            Ok(_) => true,
            Err(AuthError::Forbidden(_)) => false,
            Err(AuthError::Unauthorized) => panic!("{token} was not recognised"),
        }
    }

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn patterns_are_exact_prefix_or_all() {
        assert_eq!(Pattern::parse("*"), Ok(Pattern::All));
        assert_eq!(Pattern::parse("app-*"), Ok(Pattern::Prefix("app-".into())));
        assert_eq!(
            Pattern::parse("config"),
            Ok(Pattern::Exact("config".into()))
        );
        assert!(Pattern::All.matches("anything"));
        let prefix = Pattern::parse("app-*").unwrap();
        assert!(prefix.matches("app-1") && prefix.matches("app-"));
        assert!(!prefix.matches("app") && !prefix.matches("xapp-1"));
        let exact = Pattern::parse("config").unwrap();
        assert!(exact.matches("config"));
        assert!(!exact.matches("config2") && !exact.matches("confi"));
        for bad in ["", "a*b", "**", "*a", "a\u{7}"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn write_includes_read_and_the_strongest_pattern_wins() {
        let (_dir, auth) = auth_from(&example());
        assert!(check(&auth, WEB, Right::Write, Some("app-1")));
        assert!(check(&auth, WEB, Right::Read, Some("app-1")));
        assert!(check(&auth, WEB, Right::Read, Some("config")));
        assert!(!check(&auth, WEB, Right::Write, Some("config")));
        // "app-frozen": "read" also matches, but "app-*": "write" is stronger.
        assert!(check(&auth, WEB, Right::Write, Some("app-frozen")));
        assert!(!check(&auth, WEB, Right::Read, Some("other")));
        assert!(!check(&auth, WEB, Right::Read, Some("default")));
        assert!(!check(&auth, WEB, Right::Admin, None));
        assert!(!check(&auth, WEB, Right::Metrics, None));
    }

    #[test]
    fn no_collection_means_any_grant_of_that_right() {
        let (_dir, auth) = auth_from(&example());
        assert!(check(&auth, WEB, Right::Read, None));
        assert!(check(&auth, WEB, Right::Write, None));
        assert!(!check(&auth, PROM, Right::Read, None));
        assert!(!check(&auth, NOBODY, Right::Read, None));
    }

    #[test]
    fn admin_grants_everything() {
        let (_dir, auth) = auth_from(&example());
        for right in [Right::Read, Right::Write, Right::Admin, Right::Metrics] {
            assert!(check(&auth, OPS, right, Some("any")));
            assert!(check(&auth, OPS, right, None));
        }
    }

    #[test]
    fn metrics_is_a_right_of_its_own() {
        let (_dir, auth) = auth_from(&example());
        assert!(check(&auth, PROM, Right::Metrics, None));
        assert!(!check(&auth, PROM, Right::Read, Some("app-1")));
        assert!(!check(&auth, PROM, Right::Admin, None));
        assert!(!check(&auth, WEB, Right::Metrics, None));
        assert!(!check(&auth, NOBODY, Right::Metrics, None));
    }

    #[test]
    fn forbidden_says_what_is_missing() {
        let (_dir, auth) = auth_from(&example());
        let web = bearer_of(WEB);
        assert_eq!(
            auth.authorize(Some(&web), Right::Write, Some("config"))
                .unwrap_err(),
            AuthError::Forbidden("this token may not write collection \"config\"".into())
        );
        let e = Error::from(auth.authorize(Some(&web), Right::Admin, None).unwrap_err());
        assert_eq!((e.status(), e.code()), (403, "forbidden"));
    }

    #[test]
    fn unknown_missing_or_malformed_tokens_are_unauthorized() {
        let (_dir, auth) = auth_from(&example());
        let web = sha256_hex(WEB);
        for header in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer  web-secret"),
            Some("Bearer web-secret "),
            Some("Bearer web secret"),
            Some("Basic d2ViOnNlY3JldA=="),
            Some("Token web-secret"),
            Some("web-secret"),
            Some("Bearer web-secre"),
            Some("Bearer web-secret2"),
            // The digest itself is not a token: the file grants nothing to whoever reads it.
            Some(&*format!("Bearer {web}")),
        ] {
            let outcome = auth.authorize(header, Right::Read, Some("app-1"));
            assert_eq!(outcome.unwrap_err(), AuthError::Unauthorized, "{header:?}");
        }
        let e = Error::from(AuthError::Unauthorized);
        assert_eq!((e.status(), e.code()), (401, "unauthorized"));
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        let (_dir, auth) = auth_from(&example());
        for header in [
            "Bearer web-secret",
            "bearer web-secret",
            "BEARER web-secret",
        ] {
            let principal = auth.authorize(Some(header), Right::Read, Some("config"));
            assert_eq!(principal.unwrap().name(), Some("web"), "{header}");
        }
    }

    #[test]
    fn principals_filter_lists_of_collections() {
        let (_dir, auth) = auth_from(&example());
        let web = auth.authenticate(Some(&bearer_of(WEB))).unwrap();
        let names = ["app-1", "config", "default", "secrets"];
        let readable: Vec<_> = names.into_iter().filter(|c| web.can_read(c)).collect();
        assert_eq!(readable, ["app-1", "config"]);
        let nobody = auth.authenticate(Some(&bearer_of(NOBODY))).unwrap();
        assert_eq!(nobody.name(), Some("nobody"));
        assert!(names.iter().all(|c| !nobody.can_read(c)));
    }

    #[test]
    fn open_access_allows_everything_without_a_token() {
        let auth = Auth::open();
        for right in [Right::Read, Right::Write, Right::Admin, Right::Metrics] {
            let principal = auth.authorize(None, right, Some("x")).unwrap();
            assert_eq!(principal.name(), None);
            assert!(principal.can_read("anything"));
        }
        assert!(auth.authorize(Some("garbage"), Right::Write, None).is_ok());
    }

    #[test]
    fn an_empty_list_locks_everyone_out() {
        let (_dir, auth) = auth_from(r#"{"tokens":[]}"#);
        assert_eq!(
            auth.authorize(Some(&bearer_of(WEB)), Right::Read, Some("a"))
                .unwrap_err(),
            AuthError::Unauthorized
        );
    }

    #[test]
    fn digests_may_be_upper_case() {
        let upper = sha256_hex(WEB).to_uppercase();
        let text = format!(r#"{{"tokens":[{{"name":"w","sha256":"{upper}","admin":true}}]}}"#);
        let (_dir, auth) = auth_from(&text);
        assert!(check(&auth, WEB, Right::Admin, None));
    }

    #[test]
    fn every_invalid_file_is_refused_with_its_reason() {
        let hash = sha256_hex(WEB);
        let other = sha256_hex(OPS);
        let cases = [
            ("not json".to_string(), "expected"),
            ("[]".to_string(), "expected struct File"),
            ("{}".to_string(), "missing field `tokens`"),
            (
                r#"{"tokens":[],"extra":1}"#.to_string(),
                "unknown field `extra`",
            ),
            (
                format!(r#"{{"tokens":[{{"name":"a","sha256":"{hash}","colections":{{}}}}]}}"#),
                "unknown field `colections`",
            ),
            (
                r#"{"tokens":[{"name":"a","sha256":"abc"}]}"#.to_string(),
                "64 hex digits",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{}"}}]}}"#,
                    "g".repeat(64)
                ),
                "64 hex digits",
            ),
            (
                format!(r#"{{"tokens":[{{"name":"a","sha256":"{hash}0"}}]}}"#),
                "64 hex digits",
            ),
            (
                r#"{"tokens":[{"name":"a"}]}"#.to_string(),
                "missing field `sha256`",
            ),
            (
                format!(r#"{{"tokens":[{{"sha256":"{hash}"}}]}}"#),
                "missing field `name`",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{hash}","collections":{{"x":"admin"}}}}]}}"#
                ),
                "unknown variant `admin`",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{hash}","collections":{{"x":"Write"}}}}]}}"#
                ),
                "unknown variant `Write`",
            ),
            (
                format!(r#"{{"tokens":[{{"name":"a","sha256":"{hash}","collections":["x"]}}]}}"#),
                "an object of collection patterns",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{hash}","collections":{{"x":"read","x":"write"}}}}]}}"#
                ),
                "appears twice",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{hash}","collections":{{"a*b":"read"}}}}]}}"#
                ),
                "may only come last",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{hash}","collections":{{"":"read"}}}}]}}"#
                ),
                "must not be empty",
            ),
            (
                format!(r#"{{"tokens":[{{"name":"a","sha256":"{hash}","admin":"yes"}}]}}"#),
                "invalid type",
            ),
            (
                format!(r#"{{"tokens":[{{"name":"a","sha256":"{hash}","metrics":1}}]}}"#),
                "invalid type",
            ),
            (
                format!(r#"{{"tokens":[{{"name":"","sha256":"{hash}"}}]}}"#),
                "name must not be empty",
            ),
            (
                format!(r#"{{"tokens":[{{"name":"a\nb","sha256":"{hash}"}}]}}"#),
                "control characters",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{hash}"}},{{"name":"a","sha256":"{other}"}}]}}"#
                ),
                "same name",
            ),
            (
                format!(
                    r#"{{"tokens":[{{"name":"a","sha256":"{hash}"}},{{"name":"b","sha256":"{}"}}]}}"#,
                    hash.to_uppercase()
                ),
                "same sha256",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (text, needle) in cases {
            let path = write_file(dir.path(), &text);
            let err = Tokens::load(&path).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.starts_with("tokens file "), "{err}");
            assert!(err.contains(&*path.to_string_lossy()), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.json");
        let err = Auth::from_file(&path).unwrap_err();
        assert!(err.starts_with("cannot read tokens file"), "{err}");
        assert!(err.contains("absent.json"), "{err}");
    }

    #[test]
    fn reload_swaps_only_a_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &example());
        let auth = Auth::from_file(&path).unwrap();
        let ops = bearer_of(OPS);
        assert!(auth.authenticate(Some(&ops)).is_ok());

        for broken in ["{", r#"{"tokens":[{"name":"x","sha256":"nothex"}]}"#] {
            write_file(dir.path(), broken);
            assert!(auth.reload().is_err());
            assert!(auth.authenticate(Some(&ops)).is_ok(), "old tokens dropped");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(Some(&ops)).is_ok());

        let only_new = file_text(&[
            serde_json::json!({"name": "new", "sha256": sha256_hex("new-secret"), "admin": true}),
        ]);
        write_file(dir.path(), &only_new);
        assert_eq!(auth.reload(), Ok(1));
        assert_eq!(
            auth.authenticate(Some(&ops)).unwrap_err(),
            AuthError::Unauthorized
        );
        let new = auth.authenticate(Some("Bearer new-secret")).unwrap();
        assert_eq!(new.name(), Some("new"));
    }

    #[test]
    fn a_principal_keeps_its_rights_across_a_reload() {
        let (dir, auth) = auth_from(&example());
        let web = auth.authenticate(Some(&bearer_of(WEB))).unwrap();
        write_file(dir.path(), r#"{"tokens":[]}"#);
        assert_eq!(auth.reload(), Ok(0));
        assert!(web.allows(Right::Write, Some("app-1")));
    }

    #[test]
    fn a_principal_is_current_until_its_entry_changes() {
        let (dir, auth) = auth_from(&example());
        let web = auth.authenticate(Some(&bearer_of(WEB))).unwrap();
        assert!(auth.is_current(&web));
        // The same file again: new entries, equal to the old ones.
        auth.reload().unwrap();
        assert!(auth.is_current(&web));
        let narrower = file_text(
            &[serde_json::json!({"name": "web", "sha256": sha256_hex(WEB),
            "collections": {"app-*": "read"}})],
        );
        write_file(dir.path(), &narrower);
        auth.reload().unwrap();
        assert!(!auth.is_current(&web), "its rights changed");
        write_file(dir.path(), r#"{"tokens":[]}"#);
        auth.reload().unwrap();
        assert!(!auth.is_current(&web), "it was revoked");
        let open = Auth::open();
        assert!(open.is_current(&open.authenticate(None).unwrap()));
    }

    #[test]
    fn can_read_all_means_admin_or_a_star() {
        let (_dir, auth) = auth_from(&example());
        let of = |token| auth.authenticate(Some(&bearer_of(token))).unwrap();
        assert!(of(OPS).can_read_all());
        assert!(!of(WEB).can_read_all());
        assert!(!of(NOBODY).can_read_all());
        let (_dir, auth) = auth_from(&file_text(&[serde_json::json!({"name": "r",
            "sha256": sha256_hex(WEB), "collections": {"*": "read"}})]));
        assert!(
            auth.authenticate(Some(&bearer_of(WEB)))
                .unwrap()
                .can_read_all()
        );
        assert!(Auth::open().authenticate(None).unwrap().can_read_all());
    }

    #[test]
    fn open_access_has_nothing_to_reload() {
        assert_eq!(Auth::open().reload(), Ok(0));
    }

    #[test]
    fn loose_permissions_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &example());
        assert_eq!(loose_mode(&path), None);
        for mode in [0o640, 0o604, 0o644, 0o660, 0o601] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(loose_mode(&path), Some(mode));
        }
    }

    #[test]
    fn new_tokens_are_random_and_valid() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(NEW_TOKEN_PREFIX));
        assert_eq!(a.len(), NEW_TOKEN_PREFIX.len() + 2 * NEW_TOKEN_RANDOM_BYTES);
        assert_eq!(check_token(&a), Ok(()));
        assert_eq!(bearer(&bearer_of(&a)), Some(a.as_str()));
    }

    #[test]
    fn tokens_must_fit_a_header() {
        assert!(check_token("").is_err());
        assert!(check_token("a b").is_err());
        assert!(check_token("a\tb").is_err());
        assert!(check_token("caf\u{e9}").is_err());
        assert!(check_token("abc-._~+/=").is_ok());
    }

    #[test]
    fn digests_parse_from_hex() {
        let digest = sha256(WEB);
        assert_eq!(parse_digest(&hex(&digest)), Some(digest));
        assert_eq!(parse_digest(&"0".repeat(63)), None);
        assert_eq!(parse_digest(&format!("+{}", "0".repeat(63))), None);
        assert_eq!(parse_digest(&"é".repeat(32)), None);
    }
}
