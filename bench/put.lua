-- PUT /objects with body {"key":"<PREFIX><n>","value":"xxx…"}, n uniformly random in [0, KEYS), the
-- value a JSON string of VALUE_BYTES bytes (quotes included), into COLLECTION if set. Over a
-- prepopulated keyspace every PUT overwrites an existing object. SEED fixes the sequence.
local prefix = os.getenv("PREFIX") or "k"
local keys = tonumber(os.getenv("KEYS") or "10000")
local value_bytes = tonumber(os.getenv("VALUE_BYTES") or "100")
local collection = os.getenv("COLLECTION")
local path = "/objects"
if collection and collection ~= "" then path = path .. "?collection=" .. collection end
local value = '"' .. string.rep("x", value_bytes - 2) .. '"'
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  math.randomseed(tonumber(os.getenv("SEED") or "1"))
end

function request()
  local key = prefix .. math.random(0, keys - 1)
  return wrk.format("PUT", path, headers, '{"key":"' .. key .. '","value":' .. value .. '}')
end
