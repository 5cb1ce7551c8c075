-- GET /objects/<PREFIX><n> with n uniformly random in [0, KEYS), in COLLECTION if set. The keys are
-- expected to exist (bench/fill.lua or a bulk load put them there). SEED fixes the sequence.
local prefix = os.getenv("PREFIX") or "k"
local keys = tonumber(os.getenv("KEYS") or "10000")
local collection = os.getenv("COLLECTION")
local query = ""
if collection and collection ~= "" then query = "?collection=" .. collection end

function init(args)
  math.randomseed(tonumber(os.getenv("SEED") or "1"))
end

function request()
  return wrk.format("GET", "/objects/" .. prefix .. math.random(0, keys - 1) .. query)
end
