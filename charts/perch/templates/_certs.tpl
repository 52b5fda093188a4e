{{/*
What `perch-certs ensure` needs, and nothing else: the TLS Secret (get, create, patch) and the
webhook configuration (get, patch), each limited to its name where RBAC allows (create cannot be).
Call with (dict "root" $ "name" "<object name>" "annotations" (dict ...)).
*/}}
{{- define "perch.certsRbac.metadata" -}}
labels:
  {{- include "perch.labels" (dict "root" .root "component" "certs") | nindent 2 }}
{{- with .annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "perch.certsRbac" -}}
{{- $root := .root -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  {{- include "perch.certsRbac.metadata" . | nindent 2 }}
rules:
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["create"]
  - apiGroups: [""]
    resources: ["secrets"]
    resourceNames: [{{ include "perch.tlsSecretName" $root | quote }}]
    verbs: ["get", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  {{- include "perch.certsRbac.metadata" . | nindent 2 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ .name }}
subjects:
  - kind: ServiceAccount
    name: {{ .name }}
    namespace: {{ $root.Release.Namespace }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ .name }}
  {{- include "perch.certsRbac.metadata" . | nindent 2 }}
rules:
  - apiGroups: ["admissionregistration.k8s.io"]
    resources: ["mutatingwebhookconfigurations"]
    resourceNames: [{{ include "perch.webhookConfigurationName" $root | quote }}]
    verbs: ["get", "patch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ .name }}
  {{- include "perch.certsRbac.metadata" . | nindent 2 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ .name }}
subjects:
  - kind: ServiceAccount
    name: {{ .name }}
    namespace: {{ $root.Release.Namespace }}
{{- end }}

{{/*
The pod of a `perch-certs ensure` run; the webhook image carries perch-certs.
Call with (dict "root" $ "serviceAccount" "<name>" "inject" true|false).
*/}}
{{- define "perch.certsPodSpec" -}}
{{- $root := .root }}
{{- $ns := $root.Release.Namespace -}}
serviceAccountName: {{ .serviceAccount }}
restartPolicy: Never
securityContext:
  {{- include "perch.podSecurityContext" $root | nindent 2 }}
containers:
  - name: certs
    image: {{ include "perch.image" (dict "root" $root "image" $root.Values.image.webhook) | quote }}
    imagePullPolicy: {{ $root.Values.image.webhook.pullPolicy }}
    command:
      - perch-certs
    args:
      - ensure
      - {{ printf "--secret=%s/%s" $ns (include "perch.tlsSecretName" $root) | quote }}
      - {{ printf "--service=%s" (include "perch.webhookServiceName" $root) | quote }}
      - {{ printf "--namespace=%s" $ns | quote }}
      - {{ printf "--days=%d" (int $root.Values.tls.certsJob.days) | quote }}
      {{- if .inject }}
      - {{ printf "--webhook-config=%s" (include "perch.webhookConfigurationName" $root) | quote }}
      {{- end }}
    resources:
      {{- toYaml $root.Values.tls.certsJob.resources | nindent 6 }}
    securityContext:
      {{- include "perch.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      {{- include "perch.tmpVolumeMount" $root | nindent 6 }}
volumes:
  {{- include "perch.tmpVolume" $root | nindent 2 }}
{{- end }}
