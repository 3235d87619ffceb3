-- rtinfer gateway policy for HAProxy 2.6 (Lua 5.3): only the exposed pipelines are reachable.
--
-- Triton has no per-model authorization: any client allowed to infer can call every
-- loaded model, the composing steps included. This file decides, per request, whether
-- it may reach Triton at all; haproxy.cfg only wires these actions in.
--
--   lua.rtinfer_http <models>        HTTP/REST: normalize the path, allow only the routes a
--                                    client of <models> needs, forward the canonical path.
--                                    <models>: the exposed models, comma-separated
--                                    ("pipeline" or "pipeline,cascade"). With a snapshot
--                                    (GW_MODEL_DOCS), config and metadata are answered from it.
--   lua.rtinfer_model_doc            (service) a config or metadata document of the snapshot.
--   lua.rtinfer_grpc_route           gRPC: allow only the unary methods a client needs.
--   lua.rtinfer_grpc_body <models> <max>  gRPC: check the whole message with grpc_message.lua
--                                    (what Triton's protobuf parser reads, exactly one model
--                                    name), refuse compressed or incomplete messages and
--                                    messages over <max> bytes.
--   lua.rtinfer_refuse <reason>      refuse the request for <reason>.
--   lua.rtinfer_reply                answer a refused request (HTTP or gRPC status) and end it.
--   lua.rtinfer_metrics_route        metrics port: /metrics (the first replica's Triton metrics) or
--                                    /replicas/<id>/metrics (backend replica_<id>), else refused.
--   lua.rtinfer_grpc_answer          (http-response) count a gRPC answer by replica and status.
--   lua.rtinfer_replica_metrics      (service) those counts in Prometheus' text format.
--
-- A refusal only records its reason in txn.refused (the first one wins; the access log
-- prints it); haproxy.cfg answers with lua.rtinfer_reply, after the request body is in
-- where it can be: a client still sending its body would otherwise see the connection
-- (or the HTTP/2 stream) closed instead of the answer.

local grpc_message = require("grpc_message")  -- haproxy.cfg puts this directory on the Lua path

local GRPC_SERVICE = "/inference.GRPCInferenceService/"

-- reason -> HTTP status, gRPC status code, message
local REFUSALS = {
  route_not_allowed    = {403, 7,  "not exposed by this gateway"},
  model_not_allowed    = {403, 7,  "model not exposed by this gateway"},
  bad_path             = {400, 3,  "malformed request path"},
  method_not_allowed   = {405, 12, "method not allowed"},
  api_key_missing      = {401, 16, "missing API key"},
  api_key_wrong        = {401, 16, "wrong API key"},
  api_key_repeated     = {400, 16, "more than one API key header"},
  too_large            = {413, 8,  "request larger than the gateway's limit"},
  length_required      = {411, 3,  "Content-Length required"},
  rate_limited         = {429, 8,  "rate limit exceeded"},
  compressed           = {415, 12, "compressed requests are not accepted"},
  incomplete_message   = {413, 8,  "gRPC message incomplete or larger than the gateway's buffer"},
  malformed_message    = {400, 3,  "malformed gRPC message"},
  body_not_allowed     = {400, 3,  "this request takes no body"},
  doc_not_found        = {404, 5,  "no such model or version"},
}

local function refuse(txn, reason)
  if txn:get_var("txn.refused") == nil then
    txn:set_var("txn.refused", REFUSALS[reason] and reason or "route_not_allowed")
  end
end

local function reply(txn)
  local r = REFUSALS[txn:get_var("txn.refused")] or REFUSALS.route_not_allowed
  local reply = txn:reply()
  if txn:get_var("txn.api") == "grpc" then
    -- gRPC "trailers-only" answer: HTTP 200 whose headers carry the status.
    reply:set_status(200)
    reply:add_header("content-type", "application/grpc")
    reply:add_header("grpc-status", tostring(r[2]))
    reply:add_header("grpc-message", "gateway: " .. r[3])
  else
    reply:set_status(r[1])
    reply:add_header("content-type", "application/json")
    reply:set_body('{"error":"gateway: ' .. r[3] .. '"}')
  end
  txn:done(reply)
end

-- ---------------------------------------------------------------- HTTP paths

local UNRESERVED = "[%w%-%._~]"

-- RFC 3986 normalization of a raw path: percent-encoded unreserved characters decoded,
-- "." and ".." segments resolved, empty segments (double slashes) dropped. Anything
-- ambiguous (an encoded reserved character such as %2F or %00, bad escapes, ".." above
-- the root, bytes outside printable ASCII) gives nil: refused, never guessed.
local function normalize(path)
  if path == nil or path:sub(1, 1) ~= "/" or path:find("[^\33-\126]") then
    return nil
  end
  local bad = false
  local decoded = path:gsub("%%(..)", function(hex)
    local code = hex:match("^%x%x$") and tonumber(hex, 16)
    local ch = code and string.char(code)
    if not ch or not ch:match(UNRESERVED) then
      bad = true
      return ""
    end
    return ch
  end)
  if bad or decoded:find("%%") then
    return nil  -- an escape that was not two hex digits
  end
  local segments = {}
  for seg in decoded:gmatch("[^/]+") do
    if seg == ".." then
      if #segments == 0 then
        return nil
      end
      table.remove(segments)
    elseif seg ~= "." then
      segments[#segments + 1] = seg
    end
  end
  return "/" .. table.concat(segments, "/")
end

-- ---------------------------------------------------------------- model documents

-- The snapshot rtinfer/launch/model_docs.py wrote when the gateway started (GW_MODEL_DOCS): canonical
-- path -> compact JSON, one "<path>\t<json>" per line, for "/v2" (the extensions the gateway serves)
-- and "/v2/models/<m>[/versions/N][/config]" of the exposed models and their ensembles' steps, with
-- parameters, file names, paths and addresses stripped. Benchmarks (perf_analyzer, Model Analyzer) read
-- an ensemble's steps' config; this answers those reads without forwarding anything about a step to
-- Triton. Without a snapshot (nil), the exposed models' config and metadata and "/v2" go to Triton, and
-- no other model's are answered. Read once, at start (a missing file stops HAProxy).
local model_docs = nil
local documented = {}  -- model name -> true: the models the snapshot has documents of

core.register_init(function()
  local path = os.getenv("GW_MODEL_DOCS")
  if path == nil or path == "" then
    return
  end
  local f = assert(io.open(path, "rb"))
  model_docs = {}
  for line in f:lines() do
    local key, body = line:match("^(/[^\t]*)\t(.+)$")
    if key ~= nil then
      model_docs[key] = body
      local name = key:match("^/v2/models/([^/]+)$")
      if name ~= nil then
        documented[name] = true
      end
    end
  end
  f:close()
end)

-- The routes a client of the exposed models needs, on the canonical path (case-sensitive,
-- as Triton's own routing is). Versions: a positive integer. Returns the method, and the document
-- key when the answer comes from the snapshot.
local function http_route(canon, model)
  if canon == "/v2" then
    return "GET", model_docs and canon
  end
  if canon == "/v2/health/live" or canon == "/v2/health/ready" then
    return "GET"
  end
  local name, rest = canon:match("^/v2/models/([^/]+)(.*)$")
  if name == nil then
    return nil
  end
  local exposed = grpc_message.exposed(model, name)
  if not exposed and not documented[name] then
    return nil
  end
  local tail = rest:match("^/versions/[1-9]%d*(.*)$") or rest
  if tail == "" or tail == "/config" then
    return "GET", model_docs and canon  -- read-only, stripped: an exposed model's or one of its steps'
  elseif not exposed then
    return nil  -- a step: its config and metadata only, never ready, infer or anything else
  elseif tail == "/ready" then
    return "GET"
  elseif tail == "/infer" then
    return "POST"
  end
  return nil
end

core.register_action("rtinfer_http", {"http-req"}, function(txn, model)
  local canon = normalize(txn.sf:path())
  if canon == nil then
    return refuse(txn, "bad_path")
  end
  txn:set_var("txn.route", canon)
  local method, doc = http_route(canon, model)
  if method == nil then
    return refuse(txn, "route_not_allowed")
  end
  if txn.sf:method() ~= method then
    return refuse(txn, "method_not_allowed")
  end
  if method == "GET" and (txn.f:req_hdr_cnt("transfer-encoding") > 0 or
                          (txn.f:req_hdr_cnt("content-length") > 0 and txn.sf:req_hdr("content-length") ~= "0")) then
    return refuse(txn, "body_not_allowed")  -- nothing for a backend to read as a second request
  end
  if doc ~= nil then  -- haproxy.cfg answers it with lua.rtinfer_model_doc, after the key check
    if model_docs[doc] == nil then
      return refuse(txn, "doc_not_found")
    end
    txn:set_var("txn.doc", doc)
  end
  -- Triton sees exactly the path that was checked; the query string is dropped.
  txn.http:req_set_uri(canon)
end, 1)

-- ---------------------------------------------------------------- gRPC messages


core.register_action("rtinfer_grpc_route", {"http-req"}, function(txn)
  local path = txn.sf:path()
  if path == nil or path:sub(1, #GRPC_SERVICE) ~= GRPC_SERVICE then
    return refuse(txn, "route_not_allowed")
  end
  local rpc = path:sub(#GRPC_SERVICE + 1)
  txn:set_var("txn.route", rpc)
  if txn.sf:url():find("?", 1, true) or grpc_message.SCHEMAS[rpc] == nil then
    return refuse(txn, "route_not_allowed")  -- streaming, admin, statistics, shared memory, ...
  end
  if txn.sf:method() ~= "POST" then
    return refuse(txn, "method_not_allowed")
  end
  txn:set_var("txn.needs_body", true)  -- every method's message is read whole and checked
end, 0)

-- After haproxy.cfg waited for the whole body (wait-for-body), up to the buffer size: the message
-- must be one that Triton's protobuf parser reads as this file does (grpc_message.lua).
core.register_action("rtinfer_grpc_body", {"http-req"}, function(txn, model, max_bytes)
  local reason, names = grpc_message.check(txn.sf:req_body() or "", txn:get_var("txn.route"), model,
                                           tonumber(max_bytes))
  local shown = {}  -- for the log: the client chose these bytes
  for k, name in ipairs(names) do
    shown[k] = name:sub(1, 64):gsub("[^%w%-%._]", "?")
  end
  txn:set_var("txn.model", table.concat(shown, ","))
  if reason ~= nil then
    refuse(txn, reason)
  end
end, 2)

core.register_service("rtinfer_model_doc", "http", function(applet)
  local body = model_docs and model_docs[applet:get_var("txn.doc") or ""]
  if body == nil then  -- haproxy.cfg uses this service only for a document that exists
    body = '{"error":"gateway: ' .. REFUSALS.doc_not_found[3] .. '"}'
    applet:set_status(404)
  else
    applet:set_status(200)
  end
  applet:add_header("content-type", "application/json")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end)

core.register_action("rtinfer_refuse", {"http-req"}, function(txn, reason)
  refuse(txn, reason)
end, 1)

core.register_action("rtinfer_reply", {"http-req"}, function(txn)
  reply(txn)
end, 0)

-- ---------------------------------------------------------------- replicas

-- Metrics port: Triton's /metrics of the first replica, or of the replica a path names. A replica id is
-- the name of its server (rtinfer/launch/gateway.py checks the names): only the backends that exist are routed.
core.register_action("rtinfer_metrics_route", {"http-req"}, function(txn)
  local path = txn.sf:path()
  if path == "/metrics" then
    return
  end
  local id = path and path:match("^/replicas/([%w_.-]+)/metrics$")
  if id ~= nil and core.backends["replica_" .. id] ~= nil then
    txn:set_var("txn.metrics_backend", "replica_" .. id)
    return
  end
  refuse(txn, "route_not_allowed")
end, 0)

-- gRPC answers per replica and status. Triton answers a failed unary call "trailers-only": the status
-- is in the response headers, so it is seen here; an answer that carries a message has its status in
-- the trailers (OK for every Triton answer with a message) and is counted as OK. Servers and codes are
-- a fixed set: the series are bounded. One Lua state shared by all threads (lua-load): no lost counts.
local GRPC_CODES = {[0] = "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
local grpc_answers = {}  -- replica -> status -> count

core.register_action("rtinfer_grpc_answer", {"http-res"}, function(txn)
  local replica = txn.sf:srv_name()
  if replica == nil or replica == "" then
    return
  end
  local raw = txn.sf:res_fhdr("grpc-status")
  local status = "OK"
  if raw ~= nil and raw ~= "" then
    local code = raw:match("^%d+$") and tonumber(raw)
    status = (code and GRPC_CODES[code]) or "other"
    txn:set_var("txn.grpc_status", status)
  end
  local counts = grpc_answers[replica]
  if counts == nil then
    counts = {}
    grpc_answers[replica] = counts
  end
  counts[status] = (counts[status] or 0) + 1
end, 0)

core.register_service("rtinfer_replica_metrics", "http", function(applet)
  local lines = {
    "# HELP rtinfer_gateway_grpc_answers_total gRPC answers from each replica by status (trailers-only "
      .. "answers carry the refusal's status; an answer with a message counts as OK)",
    "# TYPE rtinfer_gateway_grpc_answers_total counter",
  }
  local replicas = {}
  local grpc = core.backends["triton_grpc"]
  for replica in pairs(grpc and grpc.servers or {}) do  -- every replica has a series from the start
    if grpc_answers[replica] == nil then
      grpc_answers[replica] = {OK = 0}
    end
  end
  for replica in pairs(grpc_answers) do
    replicas[#replicas + 1] = replica
  end
  table.sort(replicas)
  for _, replica in ipairs(replicas) do
    local statuses = {}
    for status in pairs(grpc_answers[replica]) do
      statuses[#statuses + 1] = status
    end
    table.sort(statuses)
    for _, status in ipairs(statuses) do
      lines[#lines + 1] = string.format('rtinfer_gateway_grpc_answers_total{replica="%s",grpc_status="%s"} %d',
                                        replica, status, grpc_answers[replica][status])
    end
  end
  local body = table.concat(lines, "\n") .. "\n"
  applet:set_status(200)
  applet:add_header("content-type", "text/plain; version=0.0.4")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end)
