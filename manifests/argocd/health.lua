-- Argo CD health check for auditwatch.dev AuditAlert and AuditStream (Lua 5.1, as Argo CD runs).
-- Progressing until the operator has seen the current spec (observedGeneration) and set Ready;
-- then Healthy when Ready is True, Degraded when it is False (the reason says why).
local hs = {}
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

local function behind(observed)
  return observed ~= nil and generation ~= nil and observed ~= generation
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for auditwatch to pick up the resource"
  return hs
end
if behind(status.observedGeneration) then
  hs.status = "Progressing"
  hs.message = "Waiting for auditwatch to apply generation " .. tostring(generation)
  return hs
end

local ready = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if behind(ready.observedGeneration) then
  hs.status = "Progressing"
  hs.message = "Waiting for auditwatch to apply generation " .. tostring(generation)
  return hs
end

local message = ready.message or ""
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message
elseif ready.status == "False" then
  hs.status = "Degraded"
  if ready.reason ~= nil and ready.reason ~= "" then
    hs.message = ready.reason .. ": " .. message
  else
    hs.message = message
  end
else
  hs.status = "Progressing"
  hs.message = message
end
return hs
