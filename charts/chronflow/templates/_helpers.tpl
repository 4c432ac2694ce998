{{/* The release's full name: the release name, with "chronflow" unless it already says so. */}}
{{- define "chronflow.fullname" -}}
{{- if contains "chronflow" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-chronflow" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "chronflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "chronflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "chronflow.selectorLabels" -}}
app.kubernetes.io/name: chronflow
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "chronflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chronflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The port of config.metrics.bind (IP:port). */}}
{{- define "chronflow.metricsPort" -}}
{{- regexFind "[0-9]+$" .Values.config.metrics.bind -}}
{{- end -}}

{{/* The Secret holding the Redis URL, if any. */}}
{{- define "chronflow.redisSecret" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else if .Values.redis.url -}}
{{- printf "%s-redis" (include "chronflow.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Refuses settings that cannot work together, saying what to change. */}}
{{- define "chronflow.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (eq .Values.config.backend_type "memory") -}}
{{- fail "replicaCount > 1 needs the Redis run ledger (HA needs Redis): set config.backend_type=redis and redis.url or redis.existingSecret; with the memory backend every replica would keep its own ledger and instants could run twice" -}}
{{- end -}}
{{- if and (eq .Values.config.backend_type "redis") (not (include "chronflow.redisSecret" .)) (not .Values.config.redis.url) (eq .Values.config.redis.host "localhost") -}}
{{- fail "config.backend_type=redis needs a Redis: set redis.url, redis.existingSecret or config.redis.host" -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.config.leader_election.enabled) -}}
{{- fail "replicaCount > 1 needs config.leader_election.enabled=true" -}}
{{- end -}}
{{- /* config: is rendered into a ConfigMap, readable by whoever may read ConfigMaps. */ -}}
{{- if .Values.config.redis.password -}}
{{- fail "config.redis.password would be stored in a ConfigMap in plain text: give the password in redis.url (kept in a Secret) or redis.existingSecret" -}}
{{- end -}}
{{- if and .Values.config.redis.url (regexMatch "://[^/@]*:[^/@]*@" .Values.config.redis.url) -}}
{{- fail "config.redis.url holds a password, which would be stored in a ConfigMap in plain text: set redis.url (kept in a Secret) or redis.existingSecret instead" -}}
{{- end -}}
{{- if and .Values.config.http.proxy (regexMatch "://[^/@]*:[^/@]*@" .Values.config.http.proxy) -}}
{{- fail "config.http.proxy holds a password, which would be stored in a ConfigMap in plain text: give SCHEDULER__HTTP__PROXY from a Secret in extraEnv instead" -}}
{{- end -}}
{{- end -}}

{{/* What the operator needs where tasks live (see the chart README). */}}
{{- define "chronflow.taskRules" -}}
- apiGroups: [chronflow.io]
  resources: [chrontasks]
  verbs: [get, list, watch]
- apiGroups: [chronflow.io]
  resources: [chrontasks/status]
  verbs: [patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets, configmaps]
  verbs: [get]
{{- if .Values.config.jobs.enabled }}
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
{{- end }}
{{- end -}}
