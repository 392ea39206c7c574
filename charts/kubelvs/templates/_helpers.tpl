{{- define "kubelvs.labels" -}}
app.kubernetes.io/name: kubelvs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
{{- define "kubelvs.selector" -}}
app.kubernetes.io/name: kubelvs
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: director
{{- end }}
