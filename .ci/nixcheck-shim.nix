# The NixOS options nixos-module.nix uses beyond those nixcheck's own NixOS stand-in declares, for
#
#   ../shared/nix/nixcheck/check.sh . --build --strict --extra-shim .ci/nixcheck-shim.nix
#
# nixcheck evaluates the module without NixOS, so every option it sets must be declared; a
# definition under a false mkIf counts too. These declarations follow the types of
# nixos/modules/services/databases/postgresql.nix (ensureUsers entries also take ensureClauses,
# left loose here). Only evaluation uses this file: NixOS itself declares the real options.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options.services.postgresql = {
    enable = mkOption {
      type = types.bool;
      default = false;
    };
    ensureDatabases = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    ensureUsers = mkOption {
      type = types.listOf (
        types.submodule {
          freeformType = types.attrsOf types.anything;
          options = {
            name = mkOption { type = types.str; };
            ensureDBOwnership = mkOption {
              type = types.bool;
              default = false;
            };
          };
        }
      );
      default = [ ];
    };
  };
}
