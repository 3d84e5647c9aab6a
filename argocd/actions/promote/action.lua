-- Promote the canary in progress now, skipping its remaining steps: the operator acts on
-- modelyard.dev/promote while its value names the canary's version.
if obj.status == nil or obj.status.canary == nil then
  error("no canary in progress: nothing to promote", 0)
end
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["modelyard.dev/promote"] = tostring(obj.status.canary.version)
return obj
