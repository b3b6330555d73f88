{{/* Chart name: also the pods' app.kubernetes.io/name, which the engines' NetworkPolicy matches. */}}
{{- define "pypto-serving.name" -}}
{{- .Chart.Name }}
{{- end }}

{{/* Full name: the release name, or <release>-<chart> when the release name does not contain the chart name. */}}
{{- define "pypto-serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := .Chart.Name }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the operator's objects (Deployment, ClusterRole, Lease, webhook configuration). */}}
{{- define "pypto-serving.operatorName" -}}
{{- printf "%s-operator" (include "pypto-serving.fullname" .) }}
{{- end }}

{{- define "pypto-serving.webhookServiceName" -}}
{{- printf "%s-webhook" (include "pypto-serving.fullname" .) }}
{{- end }}

{{- define "pypto-serving.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "pypto-serving.fullname" .) }}
{{- end }}

{{- define "pypto-serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pypto-serving.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "pypto-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pypto-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object. */}}
{{- define "pypto-serving.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pypto-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pypto-serving.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The operator's rules, read from files/operator-rbac.yaml (a copy of operator/rbac.yaml; make chart-sync). */}}
{{- define "pypto-serving.rules" -}}
{{- (.Files.Get "files/operator-rbac.yaml" | fromYaml).rules | toYaml }}
{{- end }}

{{/* The subset of the rules whose resources include any of the given names (list: [rules, names...]). */}}
{{- define "pypto-serving.rulesFor" -}}
{{- $rules := index . 0 }}
{{- $names := rest . }}
{{- $out := list }}
{{- range $rules }}
{{- $rule := . }}
{{- range $names }}
{{- if has . $rule.resources }}
{{- $out = append $out $rule }}
{{- end }}
{{- end }}
{{- end }}
{{- $out | uniq | toYaml }}
{{- end }}

{{/* Watched namespaces (list mode), validated. */}}
{{- define "pypto-serving.watchedNamespaces" -}}
{{- if and (not .Values.operator.watch.allNamespaces) (empty .Values.operator.watch.namespaces) }}
{{- fail "operator.watch: set allNamespaces: true or list the namespaces to watch" }}
{{- end }}
{{- .Values.operator.watch.namespaces | uniq | toYaml }}
{{- end }}
