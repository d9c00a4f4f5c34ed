{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "jetmail.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified release name. Components append "-gateway" and the like, so
it is cut to 52 characters to leave room for the longest suffix.
*/}}
{{- define "jetmail.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "jetmail.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "jetmail.labels" -}}
helm.sh/chart: {{ include "jetmail.chart" . }}
{{ include "jetmail.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "jetmail.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jetmail.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "jetmail.componentLabels" -}}
{{ include "jetmail.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "jetmail.componentSelectorLabels" -}}
{{ include "jetmail.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "jetmail.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
The NATS URL every component connects to: nats.url, else the trial server of
nats.embedded. Otherwise the chart does not install NATS.
*/}}
{{- define "jetmail.natsURL" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if .Values.nats.embedded.enabled -}}
{{- printf "nats://%s.%s.svc:4222" (include "jetmail.natsEmbeddedName" .) .Release.Namespace -}}
{{- else -}}
{{- required "nats.url is required: jetmail keeps its queue in an existing NATS JetStream cluster that this chart does not install. Install one (for example the official chart: helm install nats nats/nats --set config.jetstream.enabled=true --set config.cluster.enabled=true), then pass --set nats.url=nats://nats.<namespace>.svc:4222 (or, for a trial only, --set nats.embedded.enabled=true --set nats.replicas=1)" .Values.nats.url -}}
{{- end -}}
{{- end }}

{{/* Name of the trial NATS server's StatefulSet, Service and ConfigMap. */}}
{{- define "jetmail.natsEmbeddedName" -}}
{{- printf "%s-nats" (include "jetmail.fullname" .) -}}
{{- end }}

{{/*
The components' metrics ports: name -> port. The metrics Services, the
ServiceMonitors and the PrometheusRule's job names come from this list.
*/}}
{{- define "jetmail.metricsPorts" -}}
gateway: 9090
deliverer: 9091
controller: 8080
{{- end }}

{{/* Prometheus job of a component's metrics Service: (dict "ctx" $ "component" "gateway"). */}}
{{- define "jetmail.metricsJob" -}}
{{- printf "%s-%s-metrics" (include "jetmail.fullname" .ctx) .component -}}
{{- end }}

{{/*
NATS sign-in of one component: (dict "ctx" $ "role" "gateway"). natsAuthArg is
the flag, natsAuthMount the volumeMount and natsAuthVolume the volume; all
are empty when the component has no credentials Secret.
*/}}
{{- define "jetmail.natsAuthArg" -}}
{{- $cred := index .ctx.Values.nats.credentials .role -}}
{{- if $cred.secretName -}}
- --nats-{{ $cred.type | default "nkey" }}=/etc/jetmail/nats/{{ $cred.key }}
{{- end -}}
{{- end }}

{{- define "jetmail.natsAuthMount" -}}
{{- $cred := index .ctx.Values.nats.credentials .role -}}
{{- if $cred.secretName -}}
- name: nats-credentials
  mountPath: /etc/jetmail/nats
  readOnly: true
{{- end -}}
{{- end }}

{{- define "jetmail.natsAuthVolume" -}}
{{- $cred := index .ctx.Values.nats.credentials .role -}}
{{- if $cred.secretName -}}
- name: nats-credentials
  secret:
    secretName: {{ $cred.secretName }}
    defaultMode: 0440
{{- end -}}
{{- end }}

{{- define "jetmail.controllerServiceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "jetmail.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "jetmail.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jetmail.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The parts of a pod spec the three components share:
(dict "ctx" $ "c" .Values.gateway).
*/}}
{{- define "jetmail.podCommon" -}}
{{- $ := .ctx -}}
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.c.podSecurityContext | default $.Values.podSecurityContext) }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The environment every jetmail container gets. */}}
{{- define "jetmail.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- if and .resources .resources.limits .resources.limits.memory }}
{{- /* jetmail sets the Go runtime's soft limit to 90% of it (an explicit GOMEMLIMIT in extraEnv wins). */}}
- name: JETMAIL_MEMORY_LIMIT
  valueFrom:
    resourceFieldRef:
      resource: limits.memory
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one alert: (dict "ctx" $ "severity" "warning"). */}}
{{- define "jetmail.alertLabels" -}}
labels:
  severity: {{ .severity }}
  {{- with .ctx.Values.prometheusRule.alertLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* nats-server configuration of the trial server (nats.embedded). */}}
{{- define "jetmail.natsEmbeddedConf" -}}
server_name: {{ include "jetmail.natsEmbeddedName" . }}
port: 4222
http_port: 8222
jetstream {
  store_dir: /data
  {{- with .Values.nats.embedded.maxFileStore }}
  max_file_store: {{ . }}
  {{- end }}
}
{{- end }}
