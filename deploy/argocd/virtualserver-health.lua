-- Argo CD health of a kubelvs.io VirtualServer (Lua 5.1, as Argo CD runs it), from the status the
-- directors write (operator/kubelvs/core/status.py): conditions Accepted, Programmed, Ready,
-- Announced (with the election) and status.owner.
--   Healthy:     Ready=True for the current generation (and, with the election, an owner).
--   Progressing: no status yet, observedGeneration behind metadata.generation, or no director
--                has programmed this generation yet (Programmed=False, NoDirectors).
--   Degraded:    Accepted=False, programming failed on a director, a VIP with no owner, or not
--                Ready for another reason (e.g. NoReadyBackends).
local hs = {}
local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for a director to report"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for generation " .. generation .. " (observed " .. status.observedGeneration .. ")"
  return hs
end
local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    conditions[condition.type] = condition
  end
end
local function describe(condition)
  return condition.type .. "=" .. condition.status .. " (" .. (condition.reason or "") .. "): " .. (condition.message or "")
end
local accepted = conditions["Accepted"]
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(accepted)
  return hs
end
local programmed = conditions["Programmed"]
if programmed ~= nil and programmed.status == "False" then
  if programmed.reason == "NoDirectors" then
    hs.status = "Progressing"
  else
    hs.status = "Degraded"
  end
  hs.message = describe(programmed)
  return hs
end
local announced = conditions["Announced"]
if announced ~= nil and (status.owner == nil or status.owner == "") then
  hs.status = "Degraded"
  hs.message = "No director owns the VIP: " .. describe(announced)
  return hs
end
local ready = conditions["Ready"]
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  if status.owner ~= nil and status.owner ~= "" then
    hs.message = hs.message .. "; VIP owned by " .. status.owner
  end
  return hs
end
hs.status = "Degraded"
hs.message = describe(ready)
return hs
