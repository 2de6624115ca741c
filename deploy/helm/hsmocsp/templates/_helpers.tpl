{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "hsmocsp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, plus the chart name unless the release already has it. */}}
{{- define "hsmocsp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* True (non-empty) in the "replicas" topology: one signer, N servers, Redis. */}}
{{- define "hsmocsp.replicas" -}}
{{- if eq .Values.topology "replicas" }}true{{ end -}}
{{- end -}}

{{/* The pod holding the token: the one responder (single), or the signer (replicas). The
     single topology keeps its old component, so upgrading a release keeps its selector. */}}
{{- define "hsmocsp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hsmocsp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ if include "hsmocsp.replicas" . }}ocsp-signer{{ else }}ocsp-responder{{ end }}
{{- end -}}

{{/* The stateless servers of the replicas topology. */}}
{{- define "hsmocsp.serverSelectorLabels" -}}
app.kubernetes.io/name: {{ include "hsmocsp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ocsp-server
{{- end -}}

{{/* Name of the signer's Deployment and Service (replicas), the responder's (single). */}}
{{- define "hsmocsp.signerName" -}}
{{- if include "hsmocsp.replicas" . -}}
{{- printf "%s-signer" (include "hsmocsp.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- else -}}
{{- include "hsmocsp.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "hsmocsp.serverName" -}}
{{- printf "%s-server" (include "hsmocsp.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/* Labels of objects that are not one component's (ConfigMap, ServiceAccount). */}}
{{- define "hsmocsp.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "hsmocsp.labels" -}}
{{ include "hsmocsp.commonLabels" . }}
{{ include "hsmocsp.selectorLabels" . }}
{{- end -}}

{{- define "hsmocsp.serverLabels" -}}
{{ include "hsmocsp.commonLabels" . }}
{{ include "hsmocsp.serverSelectorLabels" . }}
{{- end -}}

{{- define "hsmocsp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "hsmocsp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The hsmocsp configuration: config as given; in the replicas topology plus `store`
     (from redis:) and `signer_url` (the signer's Service), so the paths of the secrets
     match the chart's mounts. One file for both roles: the pods pass --role. */}}
{{- define "hsmocsp.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- if include "hsmocsp.replicas" . -}}
{{- $r := .Values.redis -}}
{{- if not (or $r.address $r.sentinels) -}}
{{- fail "topology replicas: set redis.address (host:port) or redis.sentinels and redis.masterName" -}}
{{- end -}}
{{- $store := dict "kind" "redis" "database" $r.database "key_prefix" $r.keyPrefix -}}
{{- if $r.sentinels -}}
{{- $_ := set $store "sentinels" $r.sentinels -}}
{{- $_ := set $store "master_name" (required "redis.masterName: the Sentinel master's name" $r.masterName) -}}
{{- else -}}
{{- $_ := set $store "address" $r.address -}}
{{- end -}}
{{- with $r.username -}}
{{- $_ := set $store "username" . -}}
{{- end -}}
{{- if $r.password.existingSecret -}}
{{- $_ := set $store "password_file" (printf "%s/password" $r.password.mountPath) -}}
{{- end -}}
{{- if $r.tls.enabled -}}
{{- $tls := dict -}}
{{- if $r.tls.existingSecret -}}
{{- if $r.tls.caKey -}}{{- $_ := set $tls "ca_file" (printf "%s/ca.crt" $r.tls.mountPath) -}}{{- end -}}
{{- if $r.tls.certKey -}}{{- $_ := set $tls "cert_file" (printf "%s/tls.crt" $r.tls.mountPath) -}}{{- end -}}
{{- if $r.tls.keyKey -}}{{- $_ := set $tls "key_file" (printf "%s/tls.key" $r.tls.mountPath) -}}{{- end -}}
{{- end -}}
{{- with $r.tls.serverName -}}{{- $_ := set $tls "server_name" . -}}{{- end -}}
{{- $_ := set $store "tls" $tls -}}
{{- end -}}
{{- $_ := set $config "store" $store -}}
{{- $_ := set $config "signer_url" (printf "http://%s:%v" (include "hsmocsp.signerName" .) .Values.signerService.port) -}}
{{- if .Values.server.hotCacheEntries -}}
{{- $_ := set $config "hot_cache_entries" .Values.server.hotCacheEntries -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Volume mounts / volumes of the Redis password and TLS files (replicas topology). */}}
{{- define "hsmocsp.redisMounts" -}}
{{- if include "hsmocsp.replicas" . -}}
{{- if .Values.redis.password.existingSecret }}
- name: redis-password
  mountPath: {{ .Values.redis.password.mountPath }}
  readOnly: true
{{- end }}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.existingSecret }}
- name: redis-tls
  mountPath: {{ .Values.redis.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}
{{- end -}}

{{- define "hsmocsp.redisVolumes" -}}
{{- if include "hsmocsp.replicas" . -}}
{{- $r := .Values.redis -}}
{{- if $r.password.existingSecret }}
- name: redis-password
  secret:
    secretName: {{ $r.password.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $r.password.key }}
        path: password
{{- end }}
{{- if and $r.tls.enabled $r.tls.existingSecret }}
- name: redis-tls
  secret:
    secretName: {{ $r.tls.existingSecret }}
    defaultMode: 0440
    items:
      {{- with $r.tls.caKey }}
      - key: {{ . }}
        path: ca.crt
      {{- end }}
      {{- with $r.tls.certKey }}
      - key: {{ . }}
        path: tls.crt
      {{- end }}
      {{- with $r.tls.keyKey }}
      - key: {{ . }}
        path: tls.key
      {{- end }}
{{- end }}
{{- end -}}
{{- end -}}
