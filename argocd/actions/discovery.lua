-- Argo CD action discovery for modelyard.dev/ModelDeployment: which of promote, abort and
-- retry the resource's status allows right now (Lua 5.1, gopher-lua, no string library).
--   promote, abort: while a canary is in progress (status.canary)
--   retry: after a rollback, while the newest version of status.versions is the
--          rolled-back status.targetVersion (i.e. spec.model.version still names it)
actions = {}
local status = obj.status or {}

local inCanary = status.canary ~= nil

local canRetry = false
if status.versions ~= nil and status.versions[1] ~= nil then
  local newest = status.versions[1]
  canRetry = newest.phase == "RolledBack" and status.targetVersion ~= nil
    and newest.version == status.targetVersion
end

actions["promote"] = {["disabled"] = not inCanary, ["displayName"] = "Promote canary"}
actions["abort"] = {["disabled"] = not inCanary, ["displayName"] = "Abort rollout"}
actions["retry"] = {["disabled"] = not canRetry, ["displayName"] = "Retry rollout"}
return actions
