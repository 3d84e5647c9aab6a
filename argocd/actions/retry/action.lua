-- Retry the rollout of status.targetVersion after it was rolled back or aborted.
-- The operator treats modelyard.dev/retry as a new request when its value differs
-- from status.handledRequests.retry, so write a fresh token: the time (UTC, to the
-- second), with "-2", "-3"... appended while it equals the current or the handled value.
local versions = (obj.status or {}).versions
local newest = versions ~= nil and versions[1] or nil
if newest == nil or newest.phase ~= "RolledBack"
    or newest.version ~= obj.status.targetVersion then
  error("nothing to retry: the target version was not rolled back", 0)
end
local os = require("os")
local key = "modelyard.dev/retry"
local annotations = obj.metadata.annotations
if annotations == nil then
  annotations = {}
end
local handled = (obj.status or {}).handledRequests or {}
local stamp = os.date("!%Y-%m-%dT%H:%M:%SZ")
local token = stamp
local n = 1
while token == annotations[key] or token == handled.retry do
  n = n + 1
  token = stamp .. "-" .. tostring(n)
end
annotations[key] = token
obj.metadata.annotations = annotations
return obj
