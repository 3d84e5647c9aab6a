-- Abort the rollout in progress: traffic goes back to the stable version and the new
-- version is recorded RolledBack.
-- The operator treats modelyard.dev/abort as a new request when its value differs
-- from status.handledRequests.abort, so write a fresh token: the time (UTC, to the
-- second), with "-2", "-3"... appended while it equals the current or the handled value.
if obj.status == nil or obj.status.canary == nil then
  error("no rollout in progress: nothing to abort", 0)
end
local os = require("os")
local key = "modelyard.dev/abort"
local annotations = obj.metadata.annotations
if annotations == nil then
  annotations = {}
end
local handled = (obj.status or {}).handledRequests or {}
local stamp = os.date("!%Y-%m-%dT%H:%M:%SZ")
local token = stamp
local n = 1
while token == annotations[key] or token == handled.abort do
  n = n + 1
  token = stamp .. "-" .. tostring(n)
end
annotations[key] = token
obj.metadata.annotations = annotations
return obj
