-- DELETE /objects/<PREFIX><n>: the i-th request deletes key n = (i * STRIDE) mod KEYS, so every
-- request deletes a different key, in an order scattered over the keyspace like random PUTs (a
-- plain 0, 1, 2, … would delete neighbours in the B-tree and flatter DELETE). STRIDE is the
-- integer nearest KEYS times the golden ratio's fraction that shares no factor with KEYS, so each
-- request lands far from the last few whatever KEYS is (a fixed stride did not: with 400000 keys,
-- 1000003 walked two nearly sequential runs), and with KEYS keys prepopulated (bench/fill.lua) the
-- first KEYS requests each find their key; after that they get 404. At the end it prints
-- `delete: status 200=A 404=B other=C`, counted in the `response` callback (that makes wrk parse
-- every response, so the reference server is driven with this same script, to compare like with
-- like).
local prefix = os.getenv("PREFIX") or "d"
local keys = tonumber(os.getenv("KEYS") or "200000")
local function gcd(a, b)
  while b ~= 0 do a, b = b, a % b end
  return a
end
local stride = math.floor(keys * 0.6180339887 + 0.5)
while stride > 1 and gcd(stride, keys) ~= 1 do stride = stride + 1 end

local i = 0
found, missing, other = 0, 0, 0

function request()
  local n = (i * stride) % keys
  i = i + 1
  return wrk.format("DELETE", "/objects/" .. prefix .. n)
end

function response(status, headers, body)
  if status == 200 then
    found = found + 1
  elseif status == 404 then
    missing = missing + 1
  else
    other = other + 1
  end
end

-- done() runs in wrk's main Lua state; the counters live in each thread's own state.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local f, m, o = 0, 0, 0
  for _, t in ipairs(threads) do
    f, m, o = f + t:get("found"), m + t:get("missing"), o + t:get("other")
  end
  io.write(string.format("delete: status 200=%d 404=%d other=%d\n", f, m, o))
end
