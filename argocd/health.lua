-- Argo CD health check for modelyard.dev/ModelDeployment.
--
-- Argo CD runs it in gopher-lua (Lua 5.1) with `obj` set to the live resource and only
-- the base, table and os.date/os.time functions available (no string or math library),
-- and reads back `hs.status` and `hs.message`. Decided in this order:
--   1. no status yet for metadata.generation          -> Progressing
--   2. condition Degraded=True (e.g. RolledBack)      -> Degraded
--   3. a canary or preview paused for a promote       -> Suspended
--   4. condition Progressing=True, or a canary        -> Progressing
--   5. condition Ready=True, or scaled to zero        -> Healthy
--   6. anything else                                  -> Progressing
-- The source of truth for argocd/argocd-cm.yaml and docs/gitops.md (argocd/generate.py).

local function findCondition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function trueCondition(status, kind)
  local c = findCondition(status, kind)
  if c ~= nil and c.status == "True" then
    return c
  end
  return nil
end

-- "Reason: message", or whichever of the two is there.
local function describe(c)
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if message ~= "" then
    return message
  end
  return reason
end

local function canaryText(canary)
  if canary.strategy == "BlueGreen" then
    return "Blue-green preview of version " .. tostring(canary.version)
  end
  local where = canary.progress
  if where == nil or where == "" then
    where = tostring(canary.weight or 0) .. "%"
  end
  return "Canary of version " .. tostring(canary.version) .. " at " .. where
end

hs = {}
local status = obj.status
local generation = obj.metadata.generation

-- A status written for an older spec says nothing about the new one: check this first.
local stale = status == nil
if not stale and generation ~= nil then
  local observed = tonumber(status.observedGeneration)
  stale = observed == nil or observed < tonumber(generation)
end
if stale then
  hs.status = "Progressing"
  if generation ~= nil then
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  else
    hs.message = "Waiting for the operator to observe the resource"
  end
  return hs
end

local degraded = trueCondition(status, "Degraded")
if degraded ~= nil then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end

local canary = status.canary
if canary ~= nil and canary.paused == true then
  hs.status = "Suspended"
  hs.message = canaryText(canary) .. ": waiting for a manual promote"
  return hs
end

local progressing = trueCondition(status, "Progressing")
if progressing ~= nil then
  hs.status = "Progressing"
  hs.message = describe(progressing)
  return hs
end
if canary ~= nil then
  hs.status = "Progressing"
  hs.message = canaryText(canary)
  return hs
end

local version = status.stableVersion or status.targetVersion or "?"
local ready = findCondition(status, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "version " .. tostring(version) .. " serving, " ..
    tostring(status.readyReplicas or 0) .. "/" .. tostring(status.replicas or 0) ..
    " replicas ready"
  return hs
end
-- Scaled to zero on purpose (autoscaling.minReplicas: 0) is a steady state.
if ready ~= nil and ready.reason == "ScaledToZero" then
  hs.status = "Healthy"
  hs.message = "version " .. tostring(version) .. " scaled to zero"
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the model to become ready"
end
return hs
