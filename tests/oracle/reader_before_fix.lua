-- The gateway's gRPC reader as it was before the tag fix (deploy/gateway/policy.lua at 8d8e3f2), with
-- the same check() interface as deploy/gateway/grpc_message.lua. Kept so that a test shows the
-- differential test finds the bug it was written for (tests/test_gateway_differential.py).
local M = {}

-- a base-128 varint at position i of s: value, next position (nil when malformed)
local function varint(s, i, limit)
  local value, shift = 0, 0
  while i <= limit and shift < 64 do
    local b = s:byte(i)
    value = value | ((b & 0x7f) << shift)
    i = i + 1
    if b < 0x80 then
      return value, i
    end
    shift = shift + 7
  end
  return nil
end

-- Walk the top-level fields of the protobuf message s[first..last]. Returns the values
-- of field 1 (each must be length-delimited), or nil when the message is malformed.
-- Protobuf keeps the LAST of repeated scalar fields, so every occurrence counts.
local function field1_values(s, first, last)
  local names, i = {}, first
  while i <= last do
    local key
    key, i = varint(s, i, last)
    if key == nil then return nil end
    local field, wire = key >> 3, key & 7
    if field == 0 then return nil end
    if wire == 0 then
      local _
      _, i = varint(s, i, last)
      if i == nil then return nil end
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    elseif wire == 2 then
      local len
      len, i = varint(s, i, last)
      if len == nil or len < 0 or len > last - i + 1 then return nil end
      if field == 1 then
        names[#names + 1] = s:sub(i, i + len - 1)
      end
      i = i + len
    else
      return nil  -- groups (3, 4) and undefined wire types
    end
    if field == 1 and wire ~= 2 then return nil end
    if i > last + 1 then return nil end
  end
  return names
end

function M.exposed(models, name)
  for m in string.gmatch(models, "[^,]+") do
    if m == name then
      return true
    end
  end
  return false
end

-- The old rtinfer_grpc_body action, returning its reason instead of recording it.
function M.check(body, rpc, models, max_bytes)
  if #body < 5 then return "malformed_message", {} end
  local flag, length = string.unpack(">B I4", body)
  if flag ~= 0 then return "compressed", {} end
  if 5 + length > max_bytes then return "too_large", {} end
  if #body < 5 + length then return "incomplete_message", {} end
  if #body ~= 5 + length then return "malformed_message", {} end
  local names = field1_values(body, 6, #body)
  if names == nil then return "malformed_message", {} end
  if #names ~= 1 or not M.exposed(models, names[1]) then return "model_not_allowed", names end
  return nil, names
end

return M
