{{/*
Names, labels and the pieces every pod shares.
*/}}

{{- define "perch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "perch.fullname" -}}
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

{{/* A name for one component's object: "<fullname>-<suffix>", within 63 characters. */}}
{{- define "perch.componentName" -}}
{{- $fullname := include "perch.fullname" .root }}
{{- printf "%s-%s" ($fullname | trunc (int (sub 62 (len .suffix)))) .suffix | trimSuffix "-" }}
{{- end }}

{{- define "perch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component; call with (dict "root" $ "component" "webhook"). */}}
{{- define "perch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "perch.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every object's labels; call with (dict "root" $ "component" "webhook"). */}}
{{- define "perch.labels" -}}
helm.sh/chart: {{ include "perch.chart" .root }}
{{ include "perch.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: perch
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* The registration's name is fixed: the API server calls mutating webhook configurations in name
order, and Perch must come after policy engines that edit pod templates (webhook/registration.py). */}}
{{- define "perch.webhookConfigurationName" -}}
zz-perch.perch.dev
{{- end }}

{{- define "perch.webhookServiceName" -}}
{{- include "perch.componentName" (dict "root" . "suffix" "webhook") }}
{{- end }}

{{- define "perch.tlsSecretName" -}}
{{- default (include "perch.componentName" (dict "root" . "suffix" "webhook-tls")) .Values.tls.secretName }}
{{- end }}

{{- define "perch.certificateName" -}}
{{- include "perch.componentName" (dict "root" . "suffix" "webhook") }}
{{- end }}

{{- define "perch.notificationsSecretName" -}}
{{- include "perch.componentName" (dict "root" . "suffix" "notifications") }}
{{- end }}

{{/* The ServiceAccount of the pods that run the analyzer. */}}
{{- define "perch.analyzerServiceAccount" -}}
{{- if eq .Values.analyzer.mode "deployment" }}
{{- include "perch.componentName" (dict "root" . "suffix" "analyzer") }}
{{- else }}
{{- include "perch.componentName" (dict "root" . "suffix" "webhook") }}
{{- end }}
{{- end }}

{{/* An image reference; call with (dict "root" $ "image" .Values.image.webhook). */}}
{{- define "perch.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "perch.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "perch.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pods write only to /tmp (gunicorn's and prometheus_client's files): a memory-backed emptyDir. */}}
{{- define "perch.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
{{- end }}

{{- define "perch.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* An env var from a Secret key: the chart's own Secret, or the user's existing one. */}}
{{- define "perch.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      {{- if .existing.name }}
      name: {{ .existing.name }}
      key: {{ .existing.key }}
      {{- else }}
      name: {{ include "perch.notificationsSecretName" .root }}
      key: {{ .key }}
      {{- end }}
{{- end }}

{{/* The analyzer container, the same in both modes; call with (dict "root" $ "sidecar" true). */}}
{{- define "perch.analyzerContainer" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $notify := $values.notifications -}}
- name: analyzer
  image: {{ include "perch.image" (dict "root" $root "image" $values.image.analyzer) | quote }}
  imagePullPolicy: {{ $values.image.analyzer.pullPolicy }}
  command:
    - perch-analyzer
  args:
    - {{ printf "--prometheus-url=%s" $values.analyzer.prometheus.url | quote }}
    - {{ printf "--prometheus-timeout=%v" $values.analyzer.prometheus.timeoutSeconds | quote }}
    - {{ printf "--metrics-bind=0.0.0.0:%d" (int $values.analyzer.metricsPort) | quote }}
    - {{ printf "--max-active=%d" (int $values.analyzer.maxActive) | quote }}
    - --leader-elect
    - {{ printf "--lease-namespace=%s" $root.Release.Namespace | quote }}
    - {{ printf "--lease-name=%s" $values.analyzer.leaseName | quote }}
    - {{ printf "--resync-seconds=%v" $values.analyzer.resyncSeconds | quote }}
    - {{ printf "--log-level=%s" $values.logLevel | quote }}
    {{- range $values.analyzer.namespaces }}
    - {{ printf "--namespace=%s" . | quote }}
    {{- end }}
  env:
    # The leader's identity: kubectl get lease shows which pod leads.
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    {{- if or $notify.slack.url $notify.slack.existingSecret.name }}
    {{- include "perch.secretEnv" (dict "root" $root "env" "PERCH_SLACK_URL" "existing" $notify.slack.existingSecret "key" "slack-url") | nindent 4 }}
    {{- end }}
    {{- with $notify.slack.channel }}
    - name: PERCH_SLACK_CHANNEL
      value: {{ . | quote }}
    {{- end }}
    {{- with $notify.slack.username }}
    - name: PERCH_SLACK_USERNAME
      value: {{ . | quote }}
    {{- end }}
    {{- if or $notify.generic.url $notify.generic.existingSecret.name }}
    {{- include "perch.secretEnv" (dict "root" $root "env" "PERCH_NOTIFY_URL" "existing" $notify.generic.existingSecret "key" "notify-url") | nindent 4 }}
    {{- end }}
    {{- if or $notify.alertProviders $notify.alertProvidersExistingSecret.name }}
    {{- include "perch.secretEnv" (dict "root" $root "env" "PERCH_ALERT_PROVIDERS" "existing" $notify.alertProvidersExistingSecret "key" "alert-providers") | nindent 4 }}
    {{- end }}
  ports:
    - name: metrics
      containerPort: {{ $values.analyzer.metricsPort }}
      protocol: TCP
  # /healthz fails when the watch cache's threads have died, or when a leader's scheduler has not
  # resynced for three resync periods; never on the API server's state, nor while the first list
  # is still running. The startup probe gives the process a minute to come up before liveness.
  startupProbe:
    httpGet:
      path: /healthz
      port: metrics
      scheme: HTTP
    periodSeconds: 2
    timeoutSeconds: 3
    failureThreshold: 30
  livenessProbe:
    httpGet:
      path: /healthz
      port: metrics
      scheme: HTTP
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  {{- if not .sidecar }}
  # Ready once the watch cache has listed canaries and Deployments. Not probed as a sidecar: the
  # pod's readiness decides whether the API server can reach the webhook, which must not wait on it.
  readinessProbe:
    httpGet:
      path: /readyz
      port: metrics
      scheme: HTTP
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 3
  {{- end }}
  resources:
    {{- toYaml $values.analyzer.resources | nindent 4 }}
  securityContext:
    {{- include "perch.containerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    {{- include "perch.tmpVolumeMount" $root | nindent 4 }}
{{- end }}

{{/* Template-time checks of what the schema cannot express. */}}
{{- define "perch.validate" -}}
{{- $webhook := .Values.webhook }}
{{- if ge (float64 $webhook.apiTimeoutSeconds) (float64 $webhook.timeoutSeconds) }}
{{- fail (printf "webhook.apiTimeoutSeconds (%v) must be below webhook.timeoutSeconds (%v): one API call must not use up the time the API server waits for the whole answer" $webhook.apiTimeoutSeconds $webhook.timeoutSeconds) }}
{{- end }}
{{- $notify := .Values.notifications }}
{{- if and $notify.slack.url $notify.slack.existingSecret.name }}
{{- fail "notifications.slack: set url or existingSecret.name, not both" }}
{{- end }}
{{- if and $notify.generic.url $notify.generic.existingSecret.name }}
{{- fail "notifications.generic: set url or existingSecret.name, not both" }}
{{- end }}
{{- if and $notify.alertProviders $notify.alertProvidersExistingSecret.name }}
{{- fail "notifications: set alertProviders or alertProvidersExistingSecret.name, not both" }}
{{- end }}
{{- end }}
