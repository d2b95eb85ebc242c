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
iamlinkd.toml (iamlinkd --help and conf/iamlinkd.toml list every key): the typed values as a
table, and extraConfig (TOML) adding the keys they leave unset, written by toToml: one table in,
one document out, so no key is written twice. A key set both ways is refused, and so are keys the
chart sets up the node or the pod for (listen6, audit_log, cni.log_file: addresses and mounts).
*/}}
{{- define "iamlink.config" -}}
{{- $v := .Values -}}
{{- $c := dict "listen" (printf "%s:%d" $v.listen.address (int $v.listen.port)) -}}
{{- with $v.listen6.address }}
{{- $_ := set $c "listen6" (printf "[%s]:%d" . (int $v.listen6.port)) -}}
{{- end }}
{{- $_ := set $c "store_dir" $v.storeDir -}}
{{- $_ := set $c "mark_mask" (fromToml (printf "m = %s" (include "iamlink.markMask" .))).m -}}
{{- if not (kindIs "invalid" $v.credentialsAddress) }}{{ $_ := set $c "credentials_address" $v.credentialsAddress }}{{ end -}}
{{- $_ := set $c "imdsv1" $v.imdsv1 -}}
{{- $_ := set $c "proxy_allow" $v.proxyAllow -}}
{{- $_ := set $c "metrics_listen" (printf "$HOST_IP:%d" (int $v.metrics.port)) -}}
{{- with $v.auditLog }}
{{- $_ := set $c "audit_log" . -}}
{{- end }}
{{- $l := $v.limits -}}
{{- $_ := set $c "limits" (dict "requests_per_second" (int $l.requestsPerSecond) "burst" (int $l.burst) "connections_per_pod" (int $l.connectionsPerPod) "connections" (int $l.connections)) -}}
{{- $sts := dict "duration_seconds" (int $v.sts.durationSeconds) "session_tags" $v.sts.sessionTags "timeout_seconds" (int $v.sts.timeoutSeconds) "max_calls_per_second" (float64 $v.sts.maxCallsPerSecond) "call_burst" (int $v.sts.callBurst) -}}
{{- with $v.sts.region }}{{ $_ := set $sts "region" . }}{{ end -}}
{{- if $v.sts.useFips }}{{ $_ := set $sts "use_fips" true }}{{ end -}}
{{- if $v.sts.useDualStack }}{{ $_ := set $sts "use_dual_stack" true }}{{ end -}}
{{- with $v.sts.endpoint }}{{ $_ := set $sts "endpoint" . }}{{ end -}}
{{- with $v.sts.externalId }}{{ $_ := set $sts "external_id" . }}{{ end -}}
{{- with $v.sts.clusterName }}{{ $_ := set $sts "cluster_name" . }}{{ end -}}
{{- $_ := set $c "sts" $sts -}}
{{- $eksAuth := dict -}}
{{- with $v.eksAuth.endpoint }}{{ $_ := set $eksAuth "endpoint" . }}{{ end -}}
{{- with $v.eksAuth.region }}{{ $_ := set $eksAuth "region" . }}{{ end -}}
{{- with $eksAuth }}{{ $_ := set $c "eks_auth" . }}{{ end -}}
{{- $roles := dict -}}
{{- with $v.roles.baseArn }}{{ $_ := set $roles "base_arn" . }}{{ end -}}
{{- with $v.roles.default }}{{ $_ := set $roles "default" . }}{{ end -}}
{{- $pods := list -}}
{{- range $v.roles.pod }}
{{- $p := dict "namespace" (required "roles.pod[].namespace" .namespace) "role" (required "roles.pod[].role" .role) -}}
{{- with .name }}{{ $_ := set $p "name" . }}{{ end -}}
{{- $pods = append $pods $p -}}
{{- end }}
{{- with $pods }}{{ $_ := set $roles "pod" . }}{{ end -}}
{{- $associations := list -}}
{{- range $v.roles.association }}
{{- $a := dict "namespace" (required "roles.association[].namespace" .namespace) "service_account" (required "roles.association[].serviceAccount" .serviceAccount) "role" (required "roles.association[].role" .role) -}}
{{- with .targetRole }}{{ $_ := set $a "target_role" . }}{{ end -}}
{{- with .externalId }}{{ $_ := set $a "external_id" . }}{{ end -}}
{{- with .sessionPolicy }}{{ $_ := set $a "session_policy" . }}{{ end -}}
{{- if hasKey . "sessionTags" }}{{ $_ := set $a "session_tags" .sessionTags }}{{ end -}}
{{- with .sessionName }}{{ $_ := set $a "session_name" . }}{{ end -}}
{{- $associations = append $associations $a -}}
{{- end }}
{{- with $associations }}{{ $_ := set $roles "association" . }}{{ end -}}
{{- $_ := set $roles "legacy_assume_role" $v.roles.legacyAssumeRole -}}
{{- with $v.roles.legacyNamespaces }}{{ $_ := set $roles "legacy_namespaces" . }}{{ end -}}
{{- $_ := set $c "roles" $roles -}}
{{- if $v.kubernetes.enabled }}
{{- $_ := set $c "kubernetes" (dict "runtime_annotations" $v.kubernetes.runtimeAnnotations "require_namespace_permission" $v.kubernetes.requireNamespacePermission "startup_taint" $v.kubernetes.startupTaint "kubelet_pods_dir" $v.kubernetes.kubeletPodsDir "events" $v.kubernetes.events) -}}
{{- end }}
{{- $cni := dict "conf_dir" $v.cni.confDir "bin_dir" $v.cni.binDir "manage" $v.cni.manage "cache_dir" $v.cni.cacheDir -}}
{{- with $v.cni.logFile }}{{ $_ := set $cni "log_file" . }}{{ end -}}
{{- $_ := set $c "cni" $cni -}}
{{- with $v.extraConfig }}
{{- $extra := fromToml . -}}
{{- if hasKey $extra "Error" }}
{{- fail (printf "extraConfig is not TOML: %s" $extra.Error) -}}
{{- end }}
{{- range $key, $typed := dict "listen6" "listen6.address" "audit_log" "auditLog" }}
{{- if hasKey $extra $key }}
{{- fail (printf "extraConfig sets %s: set the value %s instead (the chart sets up the node or the pod for it)" $key $typed) -}}
{{- end }}
{{- end }}
{{- if and (hasKey $extra "cni") (hasKey (get $extra "cni") "log_file") }}
{{- fail "extraConfig sets cni.log_file: set the value cni.logFile instead (the chart mounts its directory)" -}}
{{- end }}
{{- range $key, $extraValue := $extra }}
{{- if hasKey $c $key }}
{{- $typed := get $c $key }}
{{- if and (kindIs "map" $typed) (kindIs "map" $extraValue) }}
{{- range $inner, $_ := $extraValue }}
{{- if hasKey $typed $inner }}
{{- fail (printf "extraConfig sets %s.%s, which a typed value sets too: set it in one place (deploy/README.md lists the typed values)" $key $inner) -}}
{{- end }}
{{- end }}
{{- else }}
{{- fail (printf "extraConfig sets %s, which a typed value sets too: set it in one place (deploy/README.md lists the typed values)" $key) -}}
{{- end }}
{{- end }}
{{- end }}
{{- $c = mustMergeOverwrite $c $extra -}}
{{- end -}}
# Rendered by the chart: its typed values, and extraConfig's keys that they leave unset.
{{ toToml $c }}
{{- end }}
