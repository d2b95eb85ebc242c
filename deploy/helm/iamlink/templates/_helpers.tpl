{{/* Labels of every object: deploy/kubernetes's app.kubernetes.io/name plus Helm's usual ones. */}}
{{- define "iamlink.labels" -}}
app.kubernetes.io/name: iamlink
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The DaemonSet's selector: the same as deploy/kubernetes's, so either install finds its pods. */}}
{{- define "iamlink.selectorLabels" -}}
app.kubernetes.io/name: iamlink
app.kubernetes.io/component: node-daemon
{{- end }}

{{- define "iamlink.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* markMask as TOML hex: a string "0x307f", or a number if the values file left it unquoted. */}}
{{- define "iamlink.markMask" -}}
{{- $m := .Values.markMask -}}
{{- if kindIs "string" $m -}}
{{- if not (regexMatch "^0x[0-9a-fA-F]{1,8}$" $m) -}}
{{- fail (printf "markMask %q: hex, like \"0x307f\"" $m) -}}
{{- end -}}
{{ $m }}
{{- else -}}
{{ printf "0x%x" (int64 $m) }}
{{- end -}}
{{- end }}

{{/*
iamlinkd.toml (conf/iamlinkd.toml documents every key). Strings go through toJson: JSON string
escapes are TOML basic-string escapes, so any value stays one TOML string.
*/}}
{{- define "iamlink.config" -}}
{{- $v := .Values -}}
listen = {{ printf "%s:%d" $v.listen.address (int $v.listen.port) | toJson }}
store_dir = {{ $v.storeDir | toJson }}
mark_mask = {{ include "iamlink.markMask" . }}
{{- if not (kindIs "invalid" $v.credentialsAddress) }}
credentials_address = {{ $v.credentialsAddress | toJson }}
{{- end }}
imdsv1 = {{ $v.imdsv1 }}
metrics_listen = {{ printf "$HOST_IP:%d" (int $v.metrics.port) | toJson }}
{{- with $v.auditLog }}
audit_log = {{ . | toJson }}
{{- end }}

[sts]
region = {{ required "sts.region" $v.sts.region | toJson }}
duration_seconds = {{ int $v.sts.durationSeconds }}
{{- with $v.sts.endpoint }}
endpoint = {{ . | toJson }}
{{- end }}
{{- with $v.sts.externalId }}
external_id = {{ . | toJson }}
{{- end }}
session_tags = {{ $v.sts.sessionTags }}

[roles]
{{- with $v.roles.baseArn }}
base_arn = {{ . | toJson }}
{{- end }}
{{- with $v.roles.default }}
default = {{ . | toJson }}
{{- end }}
{{- range $v.roles.pod }}

[[roles.pod]]
namespace = {{ required "roles.pod[].namespace" .namespace | toJson }}
{{- with .name }}
name = {{ . | toJson }}
{{- end }}
role = {{ required "roles.pod[].role" .role | toJson }}
{{- end }}
{{- range $v.roles.association }}

[[roles.association]]
namespace = {{ required "roles.association[].namespace" .namespace | toJson }}
service_account = {{ required "roles.association[].serviceAccount" .serviceAccount | toJson }}
role = {{ required "roles.association[].role" .role | toJson }}
{{- end }}
{{- if $v.kubernetes.enabled }}

[kubernetes]
# node_name: $NODE_NAME (spec.nodeName); the API through the in-cluster service account.
runtime_annotations = {{ $v.kubernetes.runtimeAnnotations }}
require_namespace_permission = {{ $v.kubernetes.requireNamespacePermission }}
startup_taint = {{ $v.kubernetes.startupTaint | toJson }}
{{- end }}

[cni]
conf_dir = {{ $v.cni.confDir | toJson }}
bin_dir = {{ $v.cni.binDir | toJson }}
{{- with $v.cni.logFile }}
log_file = {{ . | toJson }}
{{- end }}
manage = {{ $v.cni.manage }}
cache_dir = {{ $v.cni.cacheDir | toJson }}
{{- end }}
