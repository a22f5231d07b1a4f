{{/* Names and labels. */}}
{{- define "hangar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hangar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hangar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "hangar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "hangar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hangar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "hangar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hangar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret with the root password, the JWT secret and the sealing keys. */}}
{{- define "hangar.secretName" -}}
{{- default (include "hangar.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/* Checks of the values that would make a broken release. */}}
{{- define "hangar.validate" -}}
{{- if not (has .Values.store.engine (list "json" "sql")) }}
{{- fail (printf "store.engine must be json or sql, not %q" .Values.store.engine) }}
{{- end }}
{{- if and (eq .Values.store.engine "sql") (not .Values.store.databaseUrl.existingSecret) (not .Values.store.databaseUrl.value) }}
{{- fail "store.engine=sql needs store.databaseUrl.existingSecret or store.databaseUrl.value" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.serviceMonitor.bearerTokenSecret.name) (not (int .Values.metrics.port)) }}
{{- fail "serviceMonitor.enabled needs serviceMonitor.bearerTokenSecret.name (scrape /api/v1/metrics) or metrics.port (the unauthenticated metrics listener)" }}
{{- end }}
{{- end }}

{{/* Pods: one on the JSON engine. */}}
{{- define "hangar.replicas" -}}
{{- if eq .Values.store.engine "json" }}1{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/* The API prefix the probes and the ServiceMonitor use (API_PREFIX). */}}
{{- define "hangar.apiPrefix" -}}
{{- (get .Values.config "API_PREFIX") | default "/api" | trimSuffix "/" }}
{{- end }}
