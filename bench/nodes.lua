-- Spreads one wrk run over several kv nodes: wrk thread i connects to port i (mod the count) of
-- NODES ("PORT,PORT,…" on 127.0.0.1), so with -t equal to the number of nodes each node gets the
-- same share of the connections, and wrk still reports one request count and one latency
-- distribution for the whole cluster. The requests are those of the workload script WORKLOAD
-- (put.lua, get.lua, …, or none for the URL's path), with its settings from the environment as
-- usual; each thread seeds the random keys differently (SEED + thread number), so threads do not
-- write the same keys in lockstep.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local workload = os.getenv("WORKLOAD") or ""
if workload ~= "" and workload ~= "-" then dofile(dir .. workload) end

local ports = {}
for port in (os.getenv("NODES") or ""):gmatch("%d+") do ports[#ports + 1] = port end
assert(#ports > 0, "nodes.lua: set NODES to the nodes' ports, comma-separated")

local threads = 0
function setup(thread)
  local port = ports[threads % #ports + 1]
  thread.addr = wrk.lookup("127.0.0.1", port)[1]
  thread:set("thread_number", threads)
  threads = threads + 1
end

local workload_init = init
function init(args)
  if workload_init then workload_init(args) end
  math.randomseed(tonumber(os.getenv("SEED") or "1") * 1000 + (thread_number or 0))
end
