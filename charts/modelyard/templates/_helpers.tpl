{{/*
Names and labels shared by every template, and the operator's RBAC rules (one list, used by
the cluster-wide ClusterRole and by each namespaced Role alike).
*/}}

{{- define "modelyard.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "modelyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "modelyard.commonLabels" -}}
helm.sh/chart: {{ include "modelyard.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelyard
{{- end }}

{{- define "modelyard.labels" -}}
{{ include "modelyard.selectorLabels" . }}
{{ include "modelyard.commonLabels" . }}
{{- end }}

{{/* The activator's objects: same name and instance, component "activator". */}}
{{- define "modelyard.activatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "modelyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: activator
{{- end }}

{{- define "modelyard.activatorLabels" -}}
{{ include "modelyard.activatorSelectorLabels" . }}
{{ include "modelyard.commonLabels" . }}
{{- end }}

{{- define "modelyard.activatorName" -}}
{{- printf "%s-activator" (include "modelyard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelyard.activatorServiceAccountName" -}}
{{- if .Values.activator.serviceAccount.create }}
{{- default (include "modelyard.activatorName" .) .Values.activator.serviceAccount.name }}
{{- else }}
{{- required "activator.serviceAccount.name is required when activator.serviceAccount.create is false" .Values.activator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
What the operator does to the objects it manages, wherever it watches them. Every rule is
explained in docs/operations.md ("RBAC"); tests/cluster/test_rbac.py proves that the
operator needs each one and nothing more.
*/}}
{{- define "modelyard.operatorRules" -}}
- apiGroups: [modelyard.dev]
  resources: [modeldeployments]
  verbs: [list, watch]
- apiGroups: [modelyard.dev]
  resources: [modeldeployments/status]
  verbs: [patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments/scale]
  verbs: [patch]
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- /* spec.model.convert: each version's conversion Job (its index, created once, deleted
once another takes its place); its result is read from its pod's status (pods above) */}}
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [create, patch]
{{- /* each model's NetworkPolicy: its index, and applied; never deleted (it goes with
the model) */}}
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create, patch]
{{- /* the index of the slices it manages; with the activator, a model at zero's slice */}}
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch{{ if .Values.activator.enabled }}, create, patch, delete{{ end }}]
{{- if .Values.nodeCache.enabled }}
{{- /* the node cache: one claim per namespace with models, applied (never deleted) */}}
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create, patch]
{{- end }}
{{- end }}

{{/*
What the activator does in the namespaces of the models: it lists a model's pods for the
ready ones, and, when there is none, gets the ModelDeployment to tell "at zero" from "no
such model". Nothing else: it never writes.
*/}}
{{- define "modelyard.activatorRules" -}}
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [modelyard.dev]
  resources: [modeldeployments]
  verbs: [get]
{{- end }}

{{/* kopf's own machinery: it follows CRDs (and, limited to namespaces, the namespaces). */}}
{{- define "modelyard.discoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}
