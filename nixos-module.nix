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
    "RUST_LOG"
  ];

  # The name of the tokens file among the unit's credentials (`LoadCredential=`).
  tokensCredential = "tokens.json";

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
          + "tokensFile or logLevel instead (DB_PATH is always ${stateDir}).";
      }
    ];

    warnings = lib.optional (!isLoopback cfg.host && cfg.tokensFile == null) (
      "services.kv.host is \"${cfg.host}\", which is not a loopback address, and services.kv.tokensFile "
      + "is null: every client that can reach ${hostPort} can read and write all data. "
      + "Set services.kv.tokensFile, or listen on 127.0.0.1."
    );

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

    systemd.services.kv = {
      description = "kv key-value store";
      wantedBy = [ "multi-user.target" ];
      # network-online: a non-loopback host must be configured before kv can bind to it.
      after = [
        "network.target"
        "network-online.target"
      ];
      wants = [ "network-online.target" ];

      environment = cfg.environment // {
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
        ExecStart = lib.getExe cfg.package;
        EnvironmentFile = mkIf (cfg.environmentFile != null) cfg.environmentFile;
        Restart = "on-failure";

        # The dynamic user could not read a root-only file; a credential is a private copy of it,
        # readable by the service alone.
        LoadCredential = mkIf (cfg.tokensFile != null) [ "${tokensCredential}:${cfg.tokensFile}" ];
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

        DynamicUser = true;
        StateDirectory = "kv";
        StateDirectoryMode = "0700";
        UMask = "0077";

        # Hardening: kv needs none of these powers (the settings shared with kv-backup are in
        # `hardening`); it only listens on the network.
        AmbientCapabilities = mkIf privilegedPort [ "CAP_NET_BIND_SERVICE" ];
        CapabilityBoundingSet = if privilegedPort then [ "CAP_NET_BIND_SERVICE" ] else "";
        PrivateUsers = !privilegedPort;
        ProcSubset = "pid";
        ProtectProc = "invisible";
        # AF_UNIX: glibc resolves a host name in KV_HOST through nscd's Unix socket.
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
      };
    };

    # `kv backup` runs as kv's own dynamic user (same name, so the same uid while both run) on a
    # copy of the state directory's view, and writes the copy there; a privileged step then moves
    # it into `backup.dir` (which the dynamic user cannot own) and prunes old ones.
    systemd.services.kv-backup = mkIf cfg.backup.enable {
      description = "Online backup of kv's database";
      inherit (cfg.backup) startAt;
      after = [ "kv.service" ];
      environment.RUST_LOG = cfg.logLevel;
      serviceConfig = hardening // {
        Type = "oneshot";
        User = "kv";
        Group = "kv";
        DynamicUser = true;
        StateDirectory = "kv";
        StateDirectoryMode = "0700";
        UMask = "0077";
        ExecStartPre = "${pkgs.coreutils}/bin/rm -f ${stateDir}/backup-in-progress.sqlite3";
        ExecStart = "${lib.getExe cfg.package} backup --out ${stateDir}/backup-in-progress.sqlite3 --db-path ${stateDir}";
        ExecStartPost = "+${pkgs.writeShellScript "kv-backup-keep" ''
          set -eu
          install -d -m 0700 ${lib.escapeShellArg cfg.backup.dir}
          mv /var/lib/private/kv/backup-in-progress.sqlite3 \
            ${lib.escapeShellArg cfg.backup.dir}/kv-"$(date -u +%Y%m%dT%H%M%SZ)".sqlite3
          ls -1t ${lib.escapeShellArg cfg.backup.dir}/kv-*.sqlite3 | tail -n +${toString (cfg.backup.keep + 1)} \
            | xargs -r rm -f --
        ''}";
        # The hardening of kv.service, and no network at all.
        CapabilityBoundingSet = "";
        PrivateNetwork = true;
        RestrictAddressFamilies = [ "AF_UNIX" ];
      };
    };
  };

  meta.maintainers = [ ];
}
