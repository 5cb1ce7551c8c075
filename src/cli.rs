//! Subcommands that do one job and exit instead of serving: `kv token new` and `kv token hash`,
//! so that nobody needs another tool to manage the tokens file, and `kv backup` / `kv restore`.
//!
//! The work takes its input and output as parameters, so the tests run it without a process.

use std::io::{self, Read, Write};

use std::path::PathBuf;

use crate::auth;
use crate::config::DB_FILE;
use crate::store;

/// Most bytes `kv token hash` reads from stdin; a token is far shorter, so more is a mistake.
const MAX_TOKEN_INPUT_BYTES: u64 = 64 * 1024;

/// A `kv token` subcommand.
#[derive(Debug, PartialEq, Eq)]
pub enum Token {
    /// `kv token new [--name NAME]`: a new random token and its entry for the tokens file.
    New { name: Option<String> },
    /// `kv token hash`: the SHA-256 of the token on stdin.
    Hash,
}

/// Parses the arguments after `kv token`.
pub fn parse_token(args: &[String]) -> Result<Token, String> {
    let usage = "usage: kv token new [--name NAME] | kv token hash";
    let Some((sub, mut rest)) = args.split_first() else {
        return Err(format!("kv token needs a subcommand ({usage})"));
    };
    match sub.as_str() {
        "hash" => match rest.first() {
            None => Ok(Token::Hash),
            Some(arg) => Err(format!("unknown argument '{arg}' ({usage})")),
        },
        "new" => {
            let mut name = None;
            while let Some((arg, tail)) = rest.split_first() {
                rest = tail;
                let value = match arg.strip_prefix("--name") {
                    Some("") => match rest.split_first() {
                        Some((value, tail)) => {
                            rest = tail;
                            value.clone()
                        }
                        None => return Err("--name needs a value".into()),
                    },
                    Some(inline) if inline.starts_with('=') => inline[1..].to_string(),
                    _ => return Err(format!("unknown argument '{arg}' ({usage})")),
                };
                auth::check_name(&value)?;
                name = Some(value);
            }
            Ok(Token::New { name })
        }
        _ => Err(format!("unknown argument '{sub}' ({usage})")),
    }
}

/// Runs a token subcommand on the process's stdin, stdout and stderr.
pub fn token(command: &Token) -> Result<(), String> {
    run(
        command,
        io::stdin().lock(),
        io::stdout().lock(),
        io::stderr().lock(),
    )
}

fn run(
    command: &Token,
    stdin: impl Read,
    mut stdout: impl Write,
    mut stderr: impl Write,
) -> Result<(), String> {
    let write_error = |e: io::Error| format!("cannot write the output: {e}");
    match command {
        Token::New { name } => {
            let token = auth::new_token()?;
            let sha256 = auth::sha256_hex(&token);
            // The default name only has to be unique; the hash prefix is not secret.
            let name = name
                .clone()
                .unwrap_or_else(|| format!("token-{}", &sha256[..8]));
            let entry = format!(
                r#"{{"name":{},"sha256":"{sha256}","collections":{{}}}}"#,
                serde_json::Value::from(name)
            );
            writeln!(stdout, "{token}\n{entry}").map_err(write_error)?;
            // The how-to goes to stderr so that stdout stays two lines a script can take apart.
            writeln!(
                stderr,
                "The first line is the token: hand it to its client now, kv keeps only its hash.\n\
                 Add the second line to \"tokens\" in the tokens file, fill in its \"collections\"\n\
                 (pattern: \"read\" or \"write\") or set \"admin\" or \"metrics\" to true,\n\
                 then send kv SIGHUP to load it."
            )
            .map_err(write_error)
        }
        Token::Hash => {
            let token = read_token(stdin)?;
            writeln!(stdout, "{}", auth::sha256_hex(&token)).map_err(write_error)
        }
    }
}

/// The token on `input`, without one trailing "\n" or "\r\n" (so `echo TOKEN | kv token hash` works).
fn read_token(input: impl Read) -> Result<String, String> {
    let mut text = String::new();
    input
        .take(MAX_TOKEN_INPUT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
    if text.len() as u64 > MAX_TOKEN_INPUT_BYTES {
        return Err(format!(
            "stdin holds more than {MAX_TOKEN_INPUT_BYTES} bytes, which is no token"
        ));
    }
    let token = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    auth::check_token(token)
        .map_err(|e| format!("{e} (kv token hash reads one token on stdin)"))?;
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    fn run_with(command: &Token, stdin: &str) -> Result<(String, String), String> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        run(command, stdin.as_bytes(), &mut out, &mut err)?;
        Ok((
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        ))
    }

    #[test]
    fn subcommands_parse() {
        assert_eq!(parse_token(&args(&["hash"])), Ok(Token::Hash));
        assert_eq!(parse_token(&args(&["new"])), Ok(Token::New { name: None }));
        let web = Ok(Token::New {
            name: Some("web".into()),
        });
        assert_eq!(parse_token(&args(&["new", "--name", "web"])), web);
        assert_eq!(parse_token(&args(&["new", "--name=web"])), web);
        for (bad, needle) in [
            (&[][..], "needs a subcommand"),
            (&["hash", "extra"][..], "unknown argument"),
            (&["rotate"][..], "unknown argument"),
            (&["new", "--name"][..], "needs a value"),
            (&["new", "--name", ""][..], "must not be empty"),
            (&["new", "--names=x"][..], "unknown argument"),
            (&["new", "web"][..], "unknown argument"),
        ] {
            let err = parse_token(&args(bad)).unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn new_prints_the_token_then_an_entry_that_matches_it() {
        let (out, how_to) = run_with(
            &Token::New {
                name: Some("web \"1\"".into()),
            },
            "",
        )
        .unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let entry: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(entry["name"], "web \"1\"");
        assert_eq!(entry["sha256"], auth::sha256_hex(lines[0]));
        assert_eq!(entry["collections"], serde_json::json!({}));
        assert!(how_to.contains("SIGHUP"));
    }

    #[test]
    fn new_names_a_token_after_its_hash_by_default() {
        let (out, _) = run_with(&Token::New { name: None }, "").unwrap();
        let entry: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
        let sha256 = entry["sha256"].as_str().unwrap();
        assert_eq!(entry["name"], format!("token-{}", &sha256[..8]));
    }

    #[test]
    fn hash_drops_one_trailing_newline_only() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n";
        for input in ["abc", "abc\n", "abc\r\n"] {
            assert_eq!(run_with(&Token::Hash, input).unwrap().0, abc, "{input:?}");
        }
        for input in ["", "\n", "abc\n\n", "abc\r\n\r\n", " abc", "a b\n"] {
            assert!(run_with(&Token::Hash, input).is_err(), "{input:?}");
        }
        let huge = "a".repeat(MAX_TOKEN_INPUT_BYTES as usize + 1);
        assert!(
            run_with(&Token::Hash, &huge)
                .unwrap_err()
                .contains("no token")
        );
    }
}

/// `kv backup` or `kv restore`, on the database in `db_path`.
#[derive(Debug, PartialEq, Eq)]
pub enum Copy {
    /// `kv backup --out FILE [--db-path DIR] [--database-url URL]`
    Backup {
        out: PathBuf,
        db_path: PathBuf,
        /// PostgreSQL (and its password file) instead of the SQLite file in `db_path`.
        database_url: Option<String>,
        password_file: Option<PathBuf>,
    },
    /// `kv restore --from FILE [--db-path DIR]`
    Restore {
        from: PathBuf,
        db_path: PathBuf,
        /// Set when kv is configured for PostgreSQL, which `kv restore` refuses.
        database_url: Option<String>,
    },
}

/// Where `kv backup` and `kv restore` find the database unless their flags say otherwise:
/// `DB_PATH` (or the default), `KV_DATABASE_URL`, `KV_DATABASE_PASSWORD_FILE`.
pub struct CopyDefaults {
    pub db_path: PathBuf,
    pub database_url: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// Parses the arguments after `kv backup` (`restore: false`) or `kv restore`.
pub fn parse_copy(restore: bool, args: &[String], defaults: CopyDefaults) -> Result<Copy, String> {
    let (verb, file_flag) = if restore {
        ("restore", "--from")
    } else {
        ("backup", "--out")
    };
    let usage = format!("usage: kv {verb} {file_flag} FILE [--db-path DIR] [--database-url URL]");
    let (mut file, mut dir, mut url) = (None, defaults.db_path, defaults.database_url);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| rest.next().cloned())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{flag} needs a value ({usage})"))
        };
        match flag {
            f if f == file_flag => file = Some(PathBuf::from(value()?)),
            "--db-path" => dir = PathBuf::from(value()?),
            "--database-url" => url = Some(value()?),
            _ => return Err(format!("unknown argument '{arg}' ({usage})")),
        }
    }
    let file = file.ok_or_else(|| format!("kv {verb} needs {file_flag} FILE ({usage})"))?;
    if args.iter().any(|a| a.starts_with("--database-url")) {
        crate::config::refuse_password_in_flag(url.as_deref())?;
    }
    Ok(if restore {
        Copy::Restore {
            from: file,
            db_path: dir,
            database_url: url,
        }
    } else {
        Copy::Backup {
            out: file,
            db_path: dir,
            database_url: url,
            password_file: defaults.password_file,
        }
    })
}

/// Runs `kv backup` or `kv restore`, saying on stdout what it did.
pub fn copy(command: &Copy) -> Result<(), String> {
    match command {
        Copy::Backup {
            out,
            db_path,
            database_url,
            password_file,
        } => {
            let database = crate::config::database(
                database_url.as_deref(),
                password_file.as_deref(),
                db_path,
                crate::config::Sync::Full,
            )?;
            let bytes = store::backup::backup(&database, out)?;
            println!(
                "wrote a backup of {database} to {} ({bytes} bytes)",
                out.display()
            );
        }
        Copy::Restore {
            database_url: Some(_),
            ..
        } => {
            return Err(
                "kv restore puts a backup in place as the SQLite file of a data \
                        directory, not into PostgreSQL; to load it into PostgreSQL, run a kv on \
                        the restored directory and move the objects with GET /export and \
                        POST /import (pg_dump and pg_restore back up PostgreSQL itself)"
                    .into(),
            );
        }
        Copy::Restore {
            from,
            db_path,
            database_url: None,
        } => {
            let aside = store::backup::restore(&db_path.join(DB_FILE), from)?;
            println!(
                "restored {} into {}; the database it replaced (if any) is {}",
                from.display(),
                db_path.display(),
                aside.display()
            );
        }
    }
    Ok(())
}
