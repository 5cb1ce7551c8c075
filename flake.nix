{
  description = "kv: a small, durable key-value store with an HTTP/JSON API";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The package as a callPackage function, so that the overlay builds kv with the consumer's pkgs.
      kvPackage =
        { lib, rustPlatform }:
        rustPlatform.buildRustPackage {
          pname = "kv";
          inherit ((lib.importTOML ./Cargo.toml).package) version;

          # Only what cargo needs: editing the README or the Nix files does not rebuild kv.
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./Cargo.toml
              ./Cargo.lock
              ./src
              # tiny_http_fork with kv's patch, through [patch.crates-io] (see Cargo.toml).
              ./vendor
              (lib.fileset.maybeMissing ./tests)
              (lib.fileset.maybeMissing ./examples)
            ];
          };

          cargoLock.lockFile = ./Cargo.lock;

          # checkPhase runs `cargo test`: the integration tests start the real binary on
          # 127.0.0.1 with PORT=0 and temporary data directories; no network needed.
          __darwinAllowLocalNetworking = true;

          meta = {
            description = "Small, durable key-value store with an HTTP/JSON API";
            license = lib.licenses.mit;
            mainProgram = "kv";
            platforms = lib.platforms.linux ++ lib.platforms.darwin;
          };
        };

      # OCI image: kv on 0.0.0.0:3300, data in the /data volume, running as nobody (65534).
      kvImage =
        pkgs: kv:
        pkgs.dockerTools.buildLayeredImage {
          name = "kv";
          tag = kv.version;
          # /data is owned by the runtime user, so a named volume starts out writable;
          # /tmp for SQLite's temporary files.
          fakeRootCommands = ''
            mkdir -p data tmp
            chown 65534:65534 data
            chmod 0700 data
            chmod 1777 tmp
          '';
          config = {
            Entrypoint = [ (lib.getExe kv) ];
            User = "65534:65534";
            WorkingDir = "/data";
            Env = [
              "KV_HOST=0.0.0.0"
              "PORT=3300"
              "DB_PATH=/data"
            ];
            ExposedPorts."3300/tcp" = { };
            Volumes."/data" = { };
            StopSignal = "SIGTERM";
          };
        };

      vmTest =
        pkgs:
        let
          # The tokens files of the test: admin tokens `first-secret`, then also `second-secret`.
          # They hold hashes only, so their copies in the store give nothing away.
          admin = name: {
            inherit name;
            sha256 = builtins.hashString "sha256" "${name}-secret";
            admin = true;
          };
          tokensFile = names: builtins.toJSON { tokens = map admin names; };
        in
        pkgs.testers.runNixOSTest {
          name = "kv";
          nodes.machine =
            { config, pkgs, ... }:
            {
              imports = [ self.nixosModules.default ];
              services.kv.enable = true;
              services.kv.tokensFile = "/etc/kv/tokens.json";
              services.kv.maxDatabaseBytes = 64 * 1024 * 1024;
              services.kv.backup.enable = true;
              # `mode` makes these root-only files rather than links into the store.
              environment.etc."kv/tokens.json" = {
                text = tokensFile [ "first" ];
                mode = "0600";
              };
              environment.etc."kv/tokens-next.json" = {
                text = tokensFile [
                  "first"
                  "second"
                ];
                mode = "0600";
              };
              environment.systemPackages = [
                pkgs.curl
                config.services.kv.package
              ];
            };
          testScript = ''
            import json

            url = "http://127.0.0.1:3300"
            auth = "-H 'Authorization: Bearer first-secret'"

            def get_value(key):
                body = machine.succeed(f"curl --fail --silent {auth} {url}/objects/{key}")
                return json.loads(body)["value"]

            def http_status(args):
                return machine.succeed(
                    f"curl --silent --output /dev/null --write-out '%{{http_code}}' {args}"
                ).strip()

            def main_pid():
                return machine.succeed("systemctl show --property=MainPID --value kv.service").strip()

            machine.wait_for_unit("kv.service")
            machine.wait_for_open_port(3300)
            machine.succeed(f"curl --fail --silent {url}/health")

            with subtest("without a token: 401; with one: 200; /health needs none"):
                assert http_status(f"{url}/collections") == "401"
                head = machine.succeed(f"curl --silent --include {url}/collections").lower()
                assert 'www-authenticate: bearer realm="kv"' in head, head
                assert http_status(f"{auth} {url}/collections") == "200"
                assert http_status(f"{url}/health") == "200"

            with subtest("PUT then GET returns the value"):
                machine.succeed(
                    f"curl --fail --silent -X PUT {auth} -H 'Content-Type: application/json' "
                    + """--data '{"key": "greeting", "value": {"text": "hello"}}' """
                    + f"{url}/objects"
                )
                assert get_value("greeting") == {"text": "hello"}

            with subtest("systemctl reload brings in a new token, without a restart"):
                second = f"-H 'Authorization: Bearer second-secret' {url}/objects/greeting"
                assert http_status(second) == "401"
                pid = main_pid()
                machine.succeed("cp /etc/kv/tokens-next.json /etc/kv/tokens.json")
                machine.succeed("systemctl reload kv.service")
                # kv re-reads the file on its own thread, just after systemctl returns.
                machine.wait_until_succeeds(
                    f"curl --fail --silent --output /dev/null {second}", timeout=30
                )
                assert main_pid() == pid, "reload restarted kv"
                assert http_status(f"{auth} {url}/collections") == "200"

            with subtest("/ready says ready, with the quota; it needs no token"):
                ready = json.loads(machine.succeed(f"curl --fail --silent {url}/ready"))
                assert ready["status"] == "ready", ready
                assert ready["max_database_bytes"] == 64 * 1024 * 1024, ready

            with subtest("the backup unit writes a copy that restores into a fresh kv"):
                machine.succeed("systemctl start kv-backup.service")
                backup = machine.succeed("ls -1 /var/backup/kv/kv-*.sqlite3").split()
                assert len(backup) == 1, backup
                machine.succeed(
                    f"mkdir -p /tmp/restored && kv restore --from {backup[0]} --db-path /tmp/restored"
                )
                machine.succeed(
                    "PORT=3301 DB_PATH=/tmp/restored kv >/tmp/restored.log 2>&1 & "
                    + "echo $! > /tmp/restored.pid"
                )
                machine.wait_for_open_port(3301)
                body = machine.succeed("curl --fail --silent http://127.0.0.1:3301/objects/greeting")
                assert json.loads(body)["value"] == {"text": "hello"}
                machine.succeed("kill $(cat /tmp/restored.pid)")

            with subtest("kv does not run as root"):
                pid = machine.succeed("systemctl show --property=MainPID --value kv.service").strip()
                assert pid != "0", "kv.service has no main process"
                uids = machine.succeed(f"grep '^Uid:' /proc/{pid}/status").split()[1:]
                assert "0" not in uids, f"kv runs with uid 0: {uids}"

            with subtest("the value survives a restart"):
                machine.succeed("systemctl restart kv.service")
                machine.wait_for_unit("kv.service")
                machine.wait_for_open_port(3300)
                assert get_value("greeting") == {"text": "hello"}
                machine.succeed("test -s /var/lib/private/kv/kv.sqlite3")

            with subtest("SIGTERM stops kv cleanly"):
                machine.succeed("systemctl stop kv.service")
                result = machine.succeed("systemctl show --property=Result --value kv.service").strip()
                status = machine.succeed("systemctl show --property=ExecMainStatus --value kv.service").strip()
                assert result == "success" and status == "0", f"stop: Result={result} ExecMainStatus={status}"
          '';
        };

      # Two kv servers on one machine over one local PostgreSQL: kv.service from the module
      # (database.type = "postgresql", createLocally) on 3300, and kv-3301.service, the same unit
      # on 3301 with a data directory of its own (a kv locks its DB_PATH). Both run as the user kv,
      # which peer authentication lets in as the role kv.
      vmTestPostgresql =
        pkgs:
        pkgs.testers.runNixOSTest {
          name = "kv-postgresql";
          nodes.machine =
            { config, pkgs, ... }:
            let
              kv = config.systemd.services.kv;
            in
            {
              imports = [ self.nixosModules.default ];
              services.kv.enable = true;
              services.kv.database.type = "postgresql";
              services.kv.backup.enable = true;
              systemd.services.kv-3301 = {
                description = "kv on port 3301, on kv.service's database";
                wantedBy = [ "multi-user.target" ];
                inherit (kv) after wants;
                # PATH is each unit's own, derived from its `path`.
                environment = removeAttrs kv.environment [ "PATH" ] // {
                  PORT = "3301";
                  DB_PATH = "/var/lib/kv-3301";
                };
                serviceConfig = kv.serviceConfig // {
                  StateDirectory = "kv-3301";
                };
              };
              environment.systemPackages = [ pkgs.curl ];
            };
          testScript = ''
            import json

            a = "http://127.0.0.1:3300"
            b = "http://127.0.0.1:3301"

            def put(url, key, value):
                body = json.dumps({"key": key, "value": value})
                machine.succeed(
                    "curl --fail --silent -X PUT -H 'Content-Type: application/json' "
                    + f"--data '{body}' {url}/objects"
                )

            def get(url, key):
                return json.loads(machine.succeed(f"curl --fail --silent {url}/objects/{key}"))["value"]

            def main_pid(unit):
                return machine.succeed(f"systemctl show --property=MainPID --value {unit}").strip()

            def psql(query):
                return machine.succeed(f"runuser -u postgres -- psql -tAc \"{query}\"").strip()

            machine.wait_for_unit("postgresql.target")
            for unit, port in (("kv.service", 3300), ("kv-3301.service", 3301)):
                machine.wait_for_unit(unit)
                machine.wait_for_open_port(port)
            for url in (a, b):
                machine.wait_until_succeeds(f"curl --fail --silent {url}/ready", timeout=60)

            with subtest("a PUT through 3300 is read through 3301, and the other way"):
                put(a, "greeting", {"text": "hello"})
                assert get(b, "greeting") == {"text": "hello"}
                put(b, "reply", {"text": "hi"})
                assert get(a, "reply") == {"text": "hi"}

            with subtest("kv is in PostgreSQL as the role kv, over the Unix socket"):
                owner = psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'kv'")
                assert owner == "kv", owner
                sessions = psql(
                    "SELECT count(*) FROM pg_stat_activity "
                    + "WHERE usename = 'kv' AND datname = 'kv' AND client_addr IS NULL"
                )
                assert int(sessions) > 0, sessions

            with subtest("a long-poll on 3301 wakes on a write through 3300"):
                since = json.loads(
                    machine.succeed(f"curl --fail --silent '{b}/changes?since=0&values=false'")
                )["last_rev"]
                # set +e: the driver's `set -e` would skip writing the status of a failed curl.
                machine.succeed(
                    f"(set +e; curl --fail --silent '{b}/changes?since={since}&wait=30' "
                    + "> /tmp/longpoll.json; echo $? > /tmp/longpoll.status) </dev/null >/dev/null 2>&1 &"
                )
                # Parked on 3301 before the write, so the write is what answers it.
                machine.wait_until_succeeds(
                    f"curl --fail --silent {b}/metrics > /tmp/metrics "
                    + "&& grep -qx 'kv_change_waiters 1' /tmp/metrics",
                    timeout=30,
                )
                put(a, "news", {"n": 1})
                # Well within its 30 s wait.
                machine.wait_until_succeeds("test -s /tmp/longpoll.status", timeout=15)
                assert machine.succeed("cat /tmp/longpoll.status").strip() == "0"
                page = json.loads(machine.succeed("cat /tmp/longpoll.json"))
                assert [c["key"] for c in page["changes"]] == ["news"], page

            with subtest("the backup unit reaches the database"):
                machine.succeed("systemctl start kv-backup.service")
                backups = machine.succeed("ls -1 /var/backup/kv/kv-*.sqlite3").split()
                assert len(backups) == 1, backups

            with subtest("PostgreSQL stops: /ready says 503, kv keeps running and reconnects"):
                pids = [main_pid(u) for u in ("kv.service", "kv-3301.service")]
                machine.succeed("systemctl stop postgresql.service")
                for url in (a, b):
                    machine.wait_until_succeeds(
                        "test $(curl --silent --output /dev/null --write-out '%{http_code}' "
                        + f"{url}/ready) = 503",
                        timeout=60,
                    )
                machine.succeed("systemctl start postgresql.target")
                for url in (a, b):
                    machine.wait_until_succeeds(f"curl --fail --silent {url}/ready", timeout=60)
                assert [main_pid(u) for u in ("kv.service", "kv-3301.service")] == pids
                put(b, "after", {"n": 2})
                assert get(a, "after") == {"n": 2}

            with subtest("SIGTERM stops both cleanly"):
                machine.succeed("systemctl stop kv.service kv-3301.service")
                for unit in ("kv.service", "kv-3301.service"):
                    result = machine.succeed(f"systemctl show --property=Result --value {unit}").strip()
                    assert result == "success", f"{unit}: Result={result}"
          '';
        };
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          kv = pkgs.callPackage kvPackage { };
        in
        {
          inherit kv;
          default = kv;
        }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux { image = kvImage pkgs kv; }
      );

      overlays.default = final: _prev: { kv = final.callPackage kvPackage { }; };

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos-module.nix ];
          services.kv.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };

      checks = forAllSystems (
        pkgs:
        { package = self.packages.${pkgs.stdenv.hostPlatform.system}.default; }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
          nixos = vmTest pkgs;
          postgresql = vmTestPostgresql pkgs;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.cargo
            pkgs.rustc
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rust-analyzer
            pkgs.sqlite
          ];
        };
      });

      # nixfmt-tree runs nixfmt (RFC 166 style) over the whole tree, so a bare `nix fmt` works.
      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
