-- wrk script: walk a pre-built table of signed WhatsApp Cloud webhooks.
--
--   wrk -t N -s bench/requests.lua URL -- FILE PATH N
--
-- FILE holds one request per line, "<X-Hub-Signature-256> <JSON body>", made ahead of time
-- by bench/common.py, so wrk spends no CPU on HMAC. Each wrk thread takes every Nth line
-- (no two threads send the same message id) and builds its requests once in init() with
-- wrk.format. When a thread runs out of lines it starts over and counts a wrap (the server
-- then sees duplicates; the orchestrator sizes FILE so that this does not happen).
-- done() prints one line "BENCH_JSON {...}" with the counts and latency percentiles (µs).

local threads = {}
local counter = 0

function setup(thread)
  thread:set("index", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local requests = {}
local n = 0
local i = 0
wraps = 0

function init(args)
  local file, path = args[1], args[2] or "/"
  local total = tonumber(args[3] or "1")
  local mine = index or 0
  local line_no = 0
  local f = assert(io.open(file, "r"))
  for line in f:lines() do
    if line_no % total == mine then
      local sig, body = line:match("^(%S+) (.*)$")
      n = n + 1
      requests[n] = wrk.format("POST", path, {
        ["Content-Type"] = "application/json",
        ["X-Hub-Signature-256"] = sig,
      }, body)
    end
    line_no = line_no + 1
  end
  f:close()
end

function request()
  i = i + 1
  if i > n then
    i = 1
    wraps = wraps + 1
  end
  return requests[i]
end

function done(summary, latency, requests_)
  local wrapped = 0
  for _, thread in ipairs(threads) do
    wrapped = wrapped + (thread:get("wraps") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"wraps":%d,"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"p99.9":%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, wrapped,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
