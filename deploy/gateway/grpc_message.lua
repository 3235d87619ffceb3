-- The gateway's reader of gRPC requests (Lua 5.3): it forwards a message only when the protobuf
-- parser Triton uses would parse it, and reads its model name exactly as that parser does.
--
-- A filter in front of a parser is only as good as their agreement. This reader does not try to
-- reproduce protobuf's leniency; it accepts a strict subset of what protobuf accepts, in which
-- every reading is unambiguous:
--   * tags: shortest encoding, at most 5 bytes, below 2^32 (protobuf keeps the low 32 bits of a
--     longer one, so `8a 80 80 80 10` is field 1 to Triton), field number >= 1;
--   * lengths: shortest encoding, at most 5 bytes, within the message;
--   * varints: at most 10 bytes, the tenth 0 or 1 (nothing above 64 bits);
--   * only the fields of the request's schema (below, from grpc_service.proto), each with its own
--     wire type (repeated numbers packed or not); no unknown fields, no groups;
--   * proto3 strings valid UTF-8 (RFC 3629, as protobuf checks them).
-- The model name is field 1 of the top-level message, and it must occur exactly once: protobuf
-- keeps the last of repeated occurrences.
--
-- tests/test_gateway_differential.py runs this file in-process against libprotobuf (C++, as Triton
-- links it) and the Python protobuf parser on generated messages; policy.lua wires it into HAProxy.

local M = {}

local MAX_DEPTH = 8  -- deeper than any message below nests

-- ---------------------------------------------------------------- schema (grpc_service.proto)
-- A field is a message (a table of fields), "string", "bytes", "varint", "fixed32", "fixed64", or a
-- repeated number ("varint[]", "fixed32[]", "fixed64[]": packed or one by one).

local INFER_PARAMETER = {"varint", "varint", "string", "fixed64", "varint"}  -- bool, int64, string, double, uint64
local PARAMETERS_ENTRY = {"string", INFER_PARAMETER}                       -- map<string, InferParameter>
local TENSOR_CONTENTS = {"varint[]", "varint[]", "varint[]", "varint[]", "varint[]", "fixed32[]", "fixed64[]", "bytes"}

M.SCHEMAS = {
  ModelInfer = {
    "string",                                                              -- 1 model_name
    "string",                                                              -- 2 model_version
    "string",                                                              -- 3 id
    PARAMETERS_ENTRY,                                                      -- 4 parameters
    {"string", "string", "varint[]", PARAMETERS_ENTRY, TENSOR_CONTENTS},   -- 5 inputs
    {"string", PARAMETERS_ENTRY},                                          -- 6 outputs
    "bytes",                                                               -- 7 raw_input_contents
  },
  ModelReady = {"string", "string"},     -- name, version
  ModelMetadata = {"string", "string"},
  ModelConfig = {"string", "string"},
  ServerLive = {},                       -- empty messages
  ServerReady = {},
  ServerMetadata = {},
}

local WIRE = {varint = 0, fixed64 = 1, fixed32 = 5}
local FIXED_SIZE = {fixed64 = 8, fixed32 = 4}

-- ---------------------------------------------------------------- wire format

-- The varint at s[i..last], at most max_bytes long: value, next index, its length, its last byte;
-- nil when it is longer or runs past last.
local function varint(s, i, last, max_bytes)
  local value, shift, n = 0, 0, 0
  while i <= last and n < max_bytes do
    local b = s:byte(i)
    value = value | ((b & 0x7f) << shift)
    i, n = i + 1, n + 1
    if b < 0x80 then
      return value, i, n, b
    end
    shift = shift + 7
  end
  return nil
end

-- A tag or a length: shortest form, at most 5 bytes (values below 2^35 fit Lua's 64-bit integers).
local function small_varint(s, i, last)
  local value, nxt, n, final = varint(s, i, last, 5)
  if value == nil or (n > 1 and final == 0) then
    return nil
  end
  return value, nxt
end

-- A scalar value: at most 10 bytes, and no bits above the 64th.
local function skip_varint(s, i, last)
  local value, nxt, n, final = varint(s, i, last, 10)
  if value == nil or (n == 10 and final > 1) then
    return nil
  end
  return nxt
end

-- Whether s[i..j] is UTF-8 as RFC 3629 defines it: no overlong forms, no surrogates, nothing above
-- U+10FFFF (what protobuf requires of a proto3 string).
local function utf8_valid(s, i, j)
  local first_high = s:find("[\128-\255]", i)
  if first_high == nil or first_high > j then
    return true  -- ASCII
  end
  i = first_high
  while i <= j do
    local c = s:byte(i)
    if c < 0x80 then
      i = i + 1
    else
      local n, lo, hi  -- continuation bytes, the range allowed for the first of them
      if c >= 0xC2 and c <= 0xDF then n, lo, hi = 1, 0x80, 0xBF
      elseif c == 0xE0 then n, lo, hi = 2, 0xA0, 0xBF
      elseif (c >= 0xE1 and c <= 0xEC) or c == 0xEE or c == 0xEF then n, lo, hi = 2, 0x80, 0xBF
      elseif c == 0xED then n, lo, hi = 2, 0x80, 0x9F
      elseif c == 0xF0 then n, lo, hi = 3, 0x90, 0xBF
      elseif c >= 0xF1 and c <= 0xF3 then n, lo, hi = 3, 0x80, 0xBF
      elseif c == 0xF4 then n, lo, hi = 3, 0x80, 0x8F
      else return false
      end
      if i + n > j then return false end
      local b = s:byte(i + 1)
      if b < lo or b > hi then return false end
      for k = i + 2, i + n do
        b = s:byte(k)
        if b < 0x80 or b > 0xBF then return false end
      end
      i = i + n + 1
    end
  end
  return true
end

-- Whether s[i..j] is a packed run of the repeated number kind ("varint[]", ...).
local function packed_valid(s, i, j, base)
  local size = FIXED_SIZE[base]
  if size then
    return (j - i + 1) % size == 0
  end
  while i <= j do
    i = skip_varint(s, i, j)
    if i == nil then return false end
  end
  return true
end

-- Whether s[i..last] is a message of the schema. With names (a table), the top level's field 1
-- values are appended to it, in order.
local function message_valid(s, i, last, schema, depth, names)
  while i <= last do
    local key
    key, i = small_varint(s, i, last)
    if key == nil or key > 0xFFFFFFFF then return false end
    local field, wire = key >> 3, key & 7
    local kind = schema[field]  -- nil for field 0 and unknown fields
    if kind == nil then return false end
    local base = type(kind) == "string" and kind:match("^(%w+)%[%]$")
    if wire == 2 then
      local len
      len, i = small_varint(s, i, last)
      if len == nil or len > last - i + 1 then return false end
      local j = i + len - 1
      if type(kind) == "table" then
        if depth >= MAX_DEPTH or not message_valid(s, i, j, kind, depth + 1) then return false end
      elseif kind == "string" then
        if not utf8_valid(s, i, j) then return false end
        if names and field == 1 then names[#names + 1] = s:sub(i, j) end
      elseif base then
        if not packed_valid(s, i, j, base) then return false end
      elseif kind ~= "bytes" then
        return false  -- a number sent length-delimited
      end
      i = j + 1
    elseif wire == WIRE[base or kind] then
      local size = FIXED_SIZE[base or kind]
      if size then
        if i + size - 1 > last then return false end
        i = i + size
      else
        i = skip_varint(s, i, last)
        if i == nil then return false end
      end
    else
      return false  -- the wrong wire type for the field, a group (3, 4), or 6, 7
    end
  end
  return true
end

-- ---------------------------------------------------------------- the decision

-- Whether name is one of the comma-separated exposed models (exact, case-sensitive match).
function M.exposed(models, name)
  for m in string.gmatch(models, "[^,]+") do
    if m == name then
      return true
    end
  end
  return false
end

-- The decision on one gRPC request body (the whole HTTP/2 body of a unary call) for method rpc:
-- nil when it may go to Triton, else the refusal's reason (policy.lua's REFUSALS); and the model
-- names the message carries (field 1), for the log.
function M.check(body, rpc, models, max_bytes)
  local schema = M.SCHEMAS[rpc]
  if schema == nil then
    return "route_not_allowed", {}
  end
  if #body < 5 then
    return "malformed_message", {}
  end
  local flag, length = string.unpack(">B I4", body)
  if flag ~= 0 then
    return "compressed", {}  -- its fields cannot be read without inflating it
  end
  if 5 + length > max_bytes then
    return "too_large", {}
  end
  if #body < 5 + length then
    return "incomplete_message", {}  -- stalled, or did not fit in the buffer
  end
  if #body ~= 5 + length then
    return "malformed_message", {}  -- a unary call carries exactly one message
  end
  local names = {}
  if not message_valid(body, 6, #body, schema, 0, names) then
    return "malformed_message", names
  end
  if rpc:sub(1, 5) == "Model" and (#names ~= 1 or not M.exposed(models, names[1])) then
    return "model_not_allowed", names
  end
  return nil, names
end

return M
