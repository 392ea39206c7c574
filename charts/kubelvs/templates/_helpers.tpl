{{/* Object names: the fullname ("kubelvs" for a release named kubelvs, as in deploy/). */}}
{{- define "kubelvs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains "kubelvs" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-kubelvs" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubelvs.labels" -}}
app.kubernetes.io/name: kubelvs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The director's selector. Stable: no release name, so that a `kubectl apply -f deploy/`
install (same labels) is adopted in place by Helm or Argo CD (a selector is immutable). */}}
{{- define "kubelvs.selector" -}}
app.kubernetes.io/name: kubelvs
app.kubernetes.io/component: director
{{- end }}

{{/* A component's selector: include "kubelvs.componentSelector" "realserver". */}}
{{- define "kubelvs.componentSelector" -}}
app.kubernetes.io/name: kubelvs
app.kubernetes.io/component: {{ . }}
{{- end }}

{{/* The image reference; the tag is a string (a YAML 1.10 would otherwise become 1.1). */}}
{{- define "kubelvs.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{- define "kubelvs.directorServiceAccount" -}}
{{- .Values.serviceAccount.name | default (printf "%s-director" (include "kubelvs.fullname" .)) -}}
{{- end }}
