-- wrk script: POST prepared request bodies in turn and print the result as one JSON line.
--   wrk -t1 -c16 -d30s --latency -s post.lua URL -- CONTENT_TYPE BODY_FILE [BODY_FILE ...]
-- Every body file is read once at start-up; each request sends the next one (round robin per thread).
local bodies = {}
local content_type = nil
local counter = 0

function init(args)
  content_type = args[1]
  for i = 2, #args do
    local handle = assert(io.open(args[i], "rb"))
    bodies[#bodies + 1] = wrk.format("POST", nil, {["Content-Type"] = content_type}, handle:read("*all"))
    handle:close()
  end
  if #bodies == 0 then error("no body files given") end
end

function request()
  counter = counter + 1
  return bodies[(counter % #bodies) + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"mean": %.1f, "p50": %d, "p90": %d, ' ..
    '"p99": %d, "p999": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
