-- GET_PERCENT % (default 70) GET /objects/<PREFIX><n>, the rest PUT of the same keyspace, n uniformly
-- random in [0, KEYS), values JSON strings of VALUE_BYTES bytes (quotes included). SEED fixes the
-- sequence.
local prefix = os.getenv("PREFIX") or "k"
local keys = tonumber(os.getenv("KEYS") or "10000")
local value_bytes = tonumber(os.getenv("VALUE_BYTES") or "100")
local get_percent = tonumber(os.getenv("GET_PERCENT") or "70")
local value = '"' .. string.rep("x", value_bytes - 2) .. '"'
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  math.randomseed(tonumber(os.getenv("SEED") or "1"))
end

function request()
  local key = prefix .. math.random(0, keys - 1)
  if math.random(100) <= get_percent then
    return wrk.format("GET", "/objects/" .. key)
  end
  return wrk.format("PUT", "/objects", headers, '{"key":"' .. key .. '","value":' .. value .. '}')
end
