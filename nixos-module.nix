# NixOS module for kv: `services.kv`.
#
# A plain module, importable without the flake. The flake's `nixosModules.default` imports it and
# sets `services.kv.package` to the flake's own build (with mkDefault, so a user value wins).
#
# kv is configured only through environment variables. Every variable set in `environment` below
# must be one that `kv --help` documents (.ci/nix-check enforces this).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkEnableOption
    mkPackageOption
    mkOption
    mkIf
    types
    ;

  cfg = config.services.kv;

  # systemd's StateDirectory = "kv" (really /var/lib/private/kv with DynamicUser). The only
  # writable path under ProtectSystem = "strict", so there is no option to move it.
  stateDir = "/var/lib/kv";

  # Variables the typed options own; `environment` may not set them (see the assertion).
  ownedVariables = [
    "PORT"
    "KV_HOST"
    "DB_PATH"
    "KV_SYNC"
    "KV_MAX_BODY_BYTES"
    "KV_WORKERS"
    "KV_TOKENS_FILE"
    "KV_MAX_DB_BYTES"
    "KV_DATABASE_URL"
    "KV_DATABASE_PASSWORD_FILE"
    "RUST_LOG"
  ];

  # The names of the tokens file and of the database password among the unit's credentials
  # (`LoadCredential=`).
  tokensCredential = "tokens.json";
  passwordCredential = "database-password";

  db = cfg.database;
  usePostgresql = db.type == "postgresql";
  localPostgresql = usePostgresql && db.createLocally;
  # A server elsewhere: kv-backup then needs the network too.
  remotePostgresql = usePostgresql && !db.createLocally;

  # With createLocally: the database and the role are both `kv` (ensureDBOwnership needs the
  # same name), and the role is the unit's user, for peer authentication over the socket.
  localUrl = "postgresql:///kv?host=/run/postgresql";

  # NixOS 25.11 moved the ensure* SQL into postgresql-setup.service and added postgresql.target,
  # reached once the database and the role exist; before, postgresql.service did it itself.
  # After= on a unit that does not exist is ignored, so this list serves both. Wants=, not
  # Requires=: Requires= would stop kv whenever PostgreSQL is stopped or restarted, and kv rides
  # that out by itself (GET /ready says 503 until it has reconnected).
  postgresqlAfter = [
    "postgresql.service"
    "postgresql.target"
  ];
  postgresqlWants = [ "postgresql.target" ];

  passwordCredentials = lib.optional (
    db.passwordFile != null
  ) "${passwordCredential}:${db.passwordFile}";

  # What kv and kv-backup are told about the database. Nothing for SQLite: without
  # KV_DATABASE_URL, kv uses kv.sqlite3 in DB_PATH.
  databaseEnvironment = {
    KV_DATABASE_URL = mkIf (db.url != null) db.url;
    # %d: systemd's specifier for the unit's credentials directory ($CREDENTIALS_DIRECTORY).
    KV_DATABASE_PASSWORD_FILE = mkIf (db.passwordFile != null) "%d/${passwordCredential}";
  };

  # With url = null the URL comes from environmentFile. Without it kv would quietly fall back to
  # SQLite in /var/lib/kv, a second, empty store; refuse to start instead.
  requireDatabaseUrl = pkgs.writeShellScript "kv-require-database-url" ''
    if [ -z "''${KV_DATABASE_URL:-}" ]; then
      echo "services.kv.database.type is postgresql, but services.kv.database.url is null and" \
        "services.kv.environmentFile does not set KV_DATABASE_URL" >&2
      exit 1
    fi
  '';
  urlFromEnvironmentFile = usePostgresql && db.url == null;

  # `postgres://user:secret@host/…` or `…?password=secret`.
  urlHasPassword =
    db.url != null
    && (
      builtins.match ".*://[^/?#@:]*:[^/?#@]*@.*" db.url != null
      || builtins.match ".*[?&]password=.*" db.url != null
    );

  isLoopback =
    host:
    builtins.elem host [
      "localhost"
      "::1"
      "[::1]"
    ]
    || lib.hasPrefix "127." host
    || lib.hasPrefix "::ffff:127." host;

  # For messages: "[::]:3300" rather than ":::3300".
  hostPort =
    if lib.hasInfix ":" cfg.host && !(lib.hasPrefix "[" cfg.host) then
      "[${cfg.host}]:${toString cfg.port}"
    else
      "${cfg.host}:${toString cfg.port}";

  # Ports below 1024 need CAP_NET_BIND_SERVICE. PrivateUsers would leave that capability valid only
  # inside the service's own user namespace, so it is turned off for those ports.
  privilegedPort = cfg.port != 0 && cfg.port < 1024;

  # The systemd hardening kv.service and kv-backup.service share: neither needs any of these
  # powers. Each adds its own capabilities and address families.
  hardening = {
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    NoNewPrivileges = true;
    PrivateDevices = true;
    PrivateTmp = true;
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHome = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectSystem = "strict";
    RemoveIPC = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
    ];
  };
in
{
  options.services.kv = {
    enable = mkEnableOption "kv, a small, durable key-value store with an HTTP/JSON API";

    package = mkPackageOption pkgs "kv" { };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address kv listens on (`KV_HOST`): an IP address or a host name.
        On anything but a loopback address, set {option}`services.kv.tokensFile`: without it every
        client that can reach kv can read and write all data. kv speaks plain HTTP; put a TLS
        reverse proxy in front of it when clients reach it over an untrusted network.
      '';
    };

    port = mkOption {
      type = types.port;
      default = 3300;
      description = "TCP port kv listens on (`PORT`).";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether to open {option}`services.kv.port` in the firewall. Only useful together with a
        non-loopback {option}`services.kv.host`.
      '';
    };

    sync = mkOption {
      type = types.enum [
        "full"
        "normal"
      ];
      default = "full";
      description = ''
        SQLite `synchronous` mode (`KV_SYNC`). `full`: a write acknowledged with 200 survives power
        loss. `normal`: faster; it survives a crash of kv, but the last writes may be lost on power loss.
      '';
    };

    maxBodyBytes = mkOption {
      type = types.ints.between 1 1000000000;
      default = 16777216;
      example = 1048576;
      description = "Largest request body in bytes (`KV_MAX_BODY_BYTES`); larger requests get 413.";
    };

    workers = mkOption {
      type = types.nullOr (types.ints.between 1 1024);
      default = null;
      example = 16;
      description = ''
        Number of SQLite read connections, i.e. requests reading the database at once (`KV_WORKERS`). `null` leaves kv's own default (2 per CPU).
      '';
    };

    maxDatabaseBytes = mkOption {
      type = types.nullOr (types.ints.between 4096 (1024 * 1024 * 1024 * 1024 * 1024));
      default = null;
      example = 10 * 1024 * 1024 * 1024;
      description = ''
        Storage quota in bytes (`KV_MAX_DB_BYTES`): the database's pages in use. A write that would
        pass it gets 507 `quota_exceeded`; deletes always work and make room. `null`: no quota.
      '';
    };

    backup = {
      enable = mkEnableOption "online backups of kv's database on a timer (`kv backup`)";

      dir = mkOption {
        type = types.str;
        default = "/var/backup/kv";
        description = ''
          Directory of the backups, `kv-<date>.sqlite3` each, readable by root only. Restore one
          with `kv restore --from FILE --db-path /var/lib/kv` while kv.service is stopped.
        '';
      };

      startAt = mkOption {
        type = with types; either str (listOf str);
        default = "daily";
        example = "*-*-* 03:15:00";
        description = "When to back up, as a systemd calendar event (see {manpage}`systemd.time(7)`).";
      };

      keep = mkOption {
        type = types.ints.positive;
        default = 7;
        description = "How many of the newest backups to keep; older ones are removed after each backup.";
      };
    };

    database = {
      type = mkOption {
        type = types.enum [
          "sqlite"
          "postgresql"
        ];
        default = "sqlite";
        description = ''
          Where kv keeps its data. `sqlite`: the file `kv.sqlite3` in /var/lib/kv, nothing else
          to run. `postgresql`: a PostgreSQL database (`KV_DATABASE_URL`), which several kv
          servers can share; /var/lib/kv then holds only kv's spool files.
        '';
      };

      createLocally = mkOption {
        type = types.bool;
        default = true;
        description = ''
          With `type = "postgresql"`: run PostgreSQL on this machine ({option}`services.postgresql`)
          with a database `kv` owned by a role `kv`, and connect over its Unix socket in
          /run/postgresql with peer authentication (kv runs as the system user `kv`, so there is
          no password). `false`: use the server that {option}`services.kv.database.url` names.
        '';
      };

      url = mkOption {
        type = types.nullOr (types.strMatching "postgres(ql)?://.*");
        default = if localPostgresql then localUrl else null;
        defaultText = lib.literalExpression ''if type == "postgresql" && createLocally then "${localUrl}" else null'';
        example = "postgres://kv@db.example.com:5432/kv?sslmode=verify-full";
        description = ''
          The PostgreSQL server and database (`KV_DATABASE_URL`): `postgres://user@host:port/db`,
          or `postgresql:///db?host=/run/postgresql` for a Unix socket; `sslmode=disable`,
          `prefer`, `require` or `verify-full` may follow. Only with `type = "postgresql"`.

          It ends up in the world-readable Nix store, so it must not hold the password: use
          {option}`services.kv.database.passwordFile`. `null`: the URL comes from
          {option}`services.kv.environmentFile` (a line `KV_DATABASE_URL=…`); kv then refuses to
          start without it rather than fall back to SQLite.
        '';
      };

      passwordFile = mkOption {
        type = types.nullOr types.externalPath;
        default = null;
        example = "/run/secrets/kv-database-password";
        description = ''
          A file holding the password of the database role (`KV_DATABASE_PASSWORD_FILE`; one
          trailing newline is dropped), for a server that asks for one. Not needed with
          `createLocally`, which uses peer authentication. Only with `type = "postgresql"`.

          Give it as a string, outside the Nix store. systemd hands it to kv with
          `LoadCredential=`, so it may be readable by root only.
        '';
      };
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      example = "debug";
      description = ''
        Log filter (`RUST_LOG`, env_logger syntax): `error`, `warn`, `info`, or `debug` (one line
        per request).
      '';
    };

    tokensFile = mkOption {
      type = types.nullOr types.externalPath;
      default = null;
      example = "/run/secrets/kv-tokens.json";
      description = ''
        The tokens file (`KV_TOKENS_FILE`): the SHA-256 of each bearer token and its rights, as
        `kv token new` prints them (see kv's README, Security). With it, every request but
        `/health` needs `Authorization: Bearer <token>`; without it, access is open.

        Give it as a string, outside the Nix store (the store is world-readable). systemd hands it
        to kv with `LoadCredential=`, so it may be readable by root only. `systemctl reload kv`
        copies it again and makes kv re-read it without dropping connections; a file that is
        missing or invalid then keeps the tokens in force (and kv logs an error).
      '';
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = lib.literalExpression ''
        {
          KV_IO_TIMEOUT_SECS = "60";
          KV_MAX_BATCH_OPS = "5000";
        }
      '';
      description = ''
        Extra environment variables for kv, for settings without an option here (see `kv --help`).
        Variables that an option above sets (${lib.concatMapStringsSep ", " (v: "`${v}`") ownedVariables})
        are not allowed here.
      '';
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/kv.env";
      description = ''
        A file of `NAME=value` lines loaded by systemd (`EnvironmentFile=`); its variables override
        all others. It is read as root before kv starts, so it may be readable by root only. Give it
        as a string: a Nix path literal would be copied into the world-readable Nix store.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = builtins.all (name: !(cfg.environment ? ${name})) ownedVariables;
        message =
          "services.kv.environment sets "
          + lib.concatStringsSep ", " (builtins.filter (name: cfg.environment ? ${name}) ownedVariables)
          + ", which a typed services.kv option owns: use host, port, sync, maxBodyBytes, workers, "
          + "tokensFile, maxDatabaseBytes, database.url, database.passwordFile or logLevel instead "
          + "(DB_PATH is always ${stateDir}).";
      }
      {
        assertion = usePostgresql || (db.url == null && db.passwordFile == null);
        message =
          "services.kv.database.url and services.kv.database.passwordFile apply only with "
          + "services.kv.database.type = \"postgresql\" (it is \"${db.type}\").";
      }
      {
        assertion = !usePostgresql || db.url != null || cfg.environmentFile != null;
        message =
          "services.kv.database.type is \"postgresql\", but services.kv.database.url is null and "
          + "there is no services.kv.environmentFile: set database.url (and the password, if any, in "
          + "database.passwordFile), or put KV_DATABASE_URL in an environmentFile.";
      }
      {
        assertion = localPostgresql -> config.services.postgresql.enable;
        message =
          "services.kv.database.createLocally needs services.postgresql.enable, which something "
          + "sets to false: set createLocally = false and database.url to use another server.";
      }
    ];

    warnings =
      lib.optional (!isLoopback cfg.host && cfg.tokensFile == null) (
        "services.kv.host is \"${cfg.host}\", which is not a loopback address, and services.kv.tokensFile "
        + "is null: every client that can reach ${hostPort} can read and write all data. "
        + "Set services.kv.tokensFile, or listen on 127.0.0.1."
      )
      ++ lib.optional urlHasPassword (
        "services.kv.database.url holds a password, which is now in the world-readable Nix store: "
        + "change that password, and give the new one in services.kv.database.passwordFile."
      );

    services.postgresql = mkIf localPostgresql {
      enable = lib.mkDefault true;
      ensureDatabases = [ "kv" ];
      ensureUsers = [
        {
          name = "kv";
          ensureDBOwnership = true;
        }
      ];
    };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

    systemd.services.kv = {
      description = "kv key-value store";
      wantedBy = [ "multi-user.target" ];
      # network-online: a non-loopback host must be configured before kv can bind to it.
      after = [
        "network.target"
        "network-online.target"
      ]
      ++ lib.optionals localPostgresql postgresqlAfter;
      wants = [ "network-online.target" ] ++ lib.optionals localPostgresql postgresqlWants;

      environment = cfg.environment // databaseEnvironment // {
        PORT = toString cfg.port;
        KV_HOST = cfg.host;
        DB_PATH = stateDir;
        KV_SYNC = cfg.sync;
        KV_MAX_BODY_BYTES = toString cfg.maxBodyBytes;
        KV_WORKERS = mkIf (cfg.workers != null) (toString cfg.workers);
        # %d: systemd's specifier for the unit's credentials directory ($CREDENTIALS_DIRECTORY).
        KV_TOKENS_FILE = mkIf (cfg.tokensFile != null) "%d/${tokensCredential}";
        KV_MAX_DB_BYTES = mkIf (cfg.maxDatabaseBytes != null) (toString cfg.maxDatabaseBytes);
        RUST_LOG = cfg.logLevel;
      };

      serviceConfig = hardening // {
        ExecStartPre = mkIf urlFromEnvironmentFile requireDatabaseUrl;
        ExecStart = lib.getExe cfg.package;
        EnvironmentFile = mkIf (cfg.environmentFile != null) cfg.environmentFile;
        Restart = "on-failure";

        # The dynamic user could not read a root-only file; a credential is a private copy of it,
        # readable by the service alone.
        LoadCredential = mkIf (cfg.tokensFile != null || db.passwordFile != null) (
          lib.optional (cfg.tokensFile != null) "${tokensCredential}:${cfg.tokensFile}"
          ++ passwordCredentials
        );
        # `systemctl reload kv`: SIGHUP makes kv re-read its tokens file, connections stay open.
        # RefreshOnReload (systemd 260 and later; NixOS 26.05 has 260) copies the credential
        # again first; an older systemd ignores the line, and then only a restart sees a new file.
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        RefreshOnReload = mkIf (cfg.tokensFile != null) "credentials";

        # kv finishes the requests in flight and checkpoints the WAL on SIGTERM, within about 5 s.
        KillSignal = "SIGTERM";
        TimeoutStopSec = "30s";

        # Each connection costs a thread and three file descriptors; kv lowers its cap to fit.
        LimitNOFILE = 65536;

        # The dynamic user's name, which would be the unit's anyway, made explicit: a local
        # PostgreSQL's peer authentication lets the system user `kv` in as the role `kv`, and
        # kv-backup shares the name (and so the uid).
        User = "kv";
        Group = "kv";
        DynamicUser = true;
        StateDirectory = "kv";
        StateDirectoryMode = "0700";
        UMask = "0077";

        # Hardening: kv needs none of these powers (the settings shared with kv-backup are in
        # `hardening`); it only listens on the network.
        AmbientCapabilities = mkIf privilegedPort [ "CAP_NET_BIND_SERVICE" ];
        CapabilityBoundingSet = if privilegedPort then [ "CAP_NET_BIND_SERVICE" ] else "";
        # Peer authentication still sees the user kv: the private user namespace maps kv's own
        # uid to itself, and PostgreSQL reads the peer's uid (SO_PEERCRED) in its own namespace,
        # where it is the dynamic uid that nss-systemd names kv (as for nixpkgs' miniflux).
        PrivateUsers = !privilegedPort;
        ProcSubset = "pid";
        ProtectProc = "invisible";
        # AF_UNIX: glibc resolves a host name in KV_HOST through nscd's Unix socket, and a local
        # PostgreSQL listens on one in /run/postgresql (ProtectSystem does not stop connecting).
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
      };
    };

    # `kv backup` runs as kv's own dynamic user (same name, so the same uid while both run, and
    # the same role for a local PostgreSQL) on a copy of the state directory's view, and writes
    # the copy there; a privileged step then moves it into `backup.dir` (which the dynamic user
    # cannot own) and prunes old ones. It is told about the database the way kv is.
    systemd.services.kv-backup = mkIf cfg.backup.enable {
      description = "Online backup of kv's database";
      inherit (cfg.backup) startAt;
      after = [ "kv.service" ] ++ lib.optionals localPostgresql postgresqlAfter;
      wants = lib.optionals localPostgresql postgresqlWants;
      environment = databaseEnvironment // {
        RUST_LOG = cfg.logLevel;
      };
      serviceConfig = hardening // {
        Type = "oneshot";
        User = "kv";
        Group = "kv";
        DynamicUser = true;
        StateDirectory = "kv";
        StateDirectoryMode = "0700";
        UMask = "0077";
        ExecStartPre = [
          "${pkgs.coreutils}/bin/rm -f ${stateDir}/backup-in-progress.sqlite3"
        ]
        ++ lib.optional urlFromEnvironmentFile requireDatabaseUrl;
        ExecStart = "${lib.getExe cfg.package} backup --out ${stateDir}/backup-in-progress.sqlite3 --db-path ${stateDir}";
        ExecStartPost = "+${pkgs.writeShellScript "kv-backup-keep" ''
          set -eu
          install -d -m 0700 ${lib.escapeShellArg cfg.backup.dir}
          mv /var/lib/private/kv/backup-in-progress.sqlite3 \
            ${lib.escapeShellArg cfg.backup.dir}/kv-"$(date -u +%Y%m%dT%H%M%SZ)".sqlite3
          ls -1t ${lib.escapeShellArg cfg.backup.dir}/kv-*.sqlite3 | tail -n +${toString (cfg.backup.keep + 1)} \
            | xargs -r rm -f --
        ''}";
        # The URL may be in the environment file; the password is a credential.
        EnvironmentFile = mkIf (usePostgresql && cfg.environmentFile != null) cfg.environmentFile;
        LoadCredential = mkIf (passwordCredentials != [ ]) passwordCredentials;
        # The hardening of kv.service, and no network unless the database is elsewhere (a local
        # PostgreSQL's Unix socket is a file, which a private network namespace still reaches).
        CapabilityBoundingSet = "";
        PrivateNetwork = !remotePostgresql;
        RestrictAddressFamilies = [
          "AF_UNIX"
        ]
        ++ lib.optionals remotePostgresql [
          "AF_INET"
          "AF_INET6"
        ];
      };
    };
  };

  meta.maintainers = [ ];
}
