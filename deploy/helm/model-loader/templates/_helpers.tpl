{{/* The chart's name, for the app.kubernetes.io/name label. */}}
{{- define "model-loader.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name when it holds the chart's name, else <release>-<name>;
DNS names stop at 63 characters, and the longest suffix used is "-object-store" (13). */}}
{{- define "model-loader.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := include "model-loader.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* What the Deployment selects its pods by (immutable once installed). */}}
{{- define "model-loader.selectorLabels" -}}
app.kubernetes.io/name: {{ include "model-loader.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "model-loader.labels" -}}
{{ include "model-loader.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "model-loader.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{- define "model-loader.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "model-loader.fullname" .)) }}
{{- end }}

{{- define "model-loader.objectStoreSecret" -}}
{{- .Values.objectStore.existingSecret | default (printf "%s-object-store" (include "model-loader.fullname" .)) }}
{{- end }}

{{/* The token file's folder, a Secret volume mounted read-only. */}}
{{- define "model-loader.authDir" -}}
/etc/model-loader/auth
{{- end }}
