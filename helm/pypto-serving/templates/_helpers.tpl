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

{{- define "pypto-serving.controlKeySecretName" -}}
{{- printf "%s-control-key" (include "pypto-serving.fullname" .) }}
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

{{/* The documents of files/operator-rbac.yaml (a copy of operator/rbac.yaml; make chart-sync), as a list. */}}
{{- define "pypto-serving.rbacDocs" -}}
{{- $docs := list }}
{{- range regexSplit "(?m)^---\\s*$" (.Files.Get "files/operator-rbac.yaml") -1 }}
{{- $docs = append $docs (fromYaml .) }}
{{- end }}
{{- toYaml $docs }}
{{- end }}

{{/* The rules in the watched namespaces (operator/rbac.yaml's first object). */}}
{{- define "pypto-serving.rules" -}}
{{- (index (include "pypto-serving.rbacDocs" . | fromYamlArray) 0).rules | toYaml }}
{{- end }}

{{/* The rules in the operator's own namespace (the second object), with the release's Lease name; empty without
leader election. */}}
{{- define "pypto-serving.selfRules" -}}
{{- $names := dict "leases" (include "pypto-serving.operatorName" .) }}
{{- $wanted := list }}
{{- if .Values.operator.leaderElection.enabled }}{{ $wanted = append $wanted "leases" }}{{ end }}
{{- $rules := (index (include "pypto-serving.rbacDocs" . | fromYamlArray) 1).rules }}
{{- include "pypto-serving.named" (list $rules $names $wanted) }}
{{- end }}

{{/* The webhook configuration rule (the third object), with the release's configuration name. */}}
{{- define "pypto-serving.webhookRules" -}}
{{- $kind := "validatingwebhookconfigurations" }}
{{- $rules := (index (include "pypto-serving.rbacDocs" . | fromYamlArray) 2).rules }}
{{- include "pypto-serving.named" (list $rules (dict $kind (include "pypto-serving.operatorName" .)) (list $kind)) }}
{{- end }}

{{/* Rules (list: [rules, resource -> name, wanted resources]) for the wanted resources only, their resourceNames
replaced by the release's object names. */}}
{{- define "pypto-serving.named" -}}
{{- $names := index . 1 }}
{{- $wanted := index . 2 }}
{{- $out := list }}
{{- range index . 0 }}
{{- $rule := deepCopy . }}
{{- $resource := first $rule.resources }}
{{- if has $resource $wanted }}
{{- if hasKey $rule "resourceNames" }}
{{- $_ := set $rule "resourceNames" (list (get $names $resource)) }}
{{- end }}
{{- $out = append $out $rule }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Watched namespaces (list mode), validated. */}}
{{- define "pypto-serving.watchedNamespaces" -}}
{{- if and (not .Values.operator.watch.allNamespaces) (empty .Values.operator.watch.namespaces) }}
{{- fail "operator.watch: set allNamespaces: true or list the namespaces to watch" }}
{{- end }}
{{- .Values.operator.watch.namespaces | uniq | toYaml }}
{{- end }}
