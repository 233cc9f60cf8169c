{{/* The release's full name, cut to the 63 characters a label value allows. */}}
{{- define "profiler-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "profiler-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "profiler-agent.labels" -}}
{{ include "profiler-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "profiler-agent.serviceAccountName" -}}
{{- default (include "profiler-agent.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Whether any network exporter is configured; without one the agent writes local files. */}}
{{- define "profiler-agent.filesOnly" -}}
{{- if and (not .Values.export.otlp.endpoint) (not .Values.export.pyroscope.url) -}}true{{- end -}}
{{- end -}}

{{/* A TOML inline table of string pairs. */}}
{{- define "profiler-agent.tomlTable" -}}
{ {{- $first := true -}}
{{- range $k, $v := . -}}
{{- if not $first }}, {{ end -}}{{- $first = false -}}
{{ $k | toJson }} = {{ $v | toString | toJson }}
{{- end -}} }
{{- end -}}
