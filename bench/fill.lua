-- Prepopulation: PUT keys PREFIX0 .. PREFIX(KEYS-1) in order, once each, with a JSON string value of
-- VALUE_BYTES bytes (quotes included), into COLLECTION (unset: the default collection). Once KEYS
-- responses have arrived it prints `fill: status 200=N other=M` and exits wrk at once (status 1 if
-- any response was not 200), so -d is only an upper bound. Run it with one wrk thread (-t1).
local prefix = os.getenv("PREFIX") or "k"
local keys = tonumber(os.getenv("KEYS") or "10000")
local value_bytes = tonumber(os.getenv("VALUE_BYTES") or "100")
local collection = os.getenv("COLLECTION")
local path = "/objects"
if collection and collection ~= "" then path = path .. "?collection=" .. collection end
local value = '"' .. string.rep("x", value_bytes - 2) .. '"'
local headers = { ["Content-Type"] = "application/json" }

local next_key, ok, failed = 0, 0, 0

function request()
  -- The requests still in flight when the last key is answered rewrite the first keys; harmless.
  local key = prefix .. (next_key % keys)
  next_key = next_key + 1
  return wrk.format("PUT", path, headers, '{"key":"' .. key .. '","value":' .. value .. '}')
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 else failed = failed + 1 end
  if ok + failed == keys then
    -- wrk would wait out its whole -d even after every thread stopped (and a SIGINT may land on a
    -- worker thread and be ignored), so leave now; the count above is all a fill needs.
    io.write(string.format("fill: status 200=%d other=%d\n", ok, failed))
    io.flush()
    os.exit(failed == 0 and 0 or 1)
  end
end

function done(summary, latency, requests)
  -- Reached only when -d ran out before KEYS responses arrived.
  io.write(string.format("fill: incomplete, %d responses of %d\n", summary.requests, keys))
end
