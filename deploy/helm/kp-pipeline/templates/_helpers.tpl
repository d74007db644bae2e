{{/* Chart name, overridable. */}}
{{- define "kp-pipeline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "kp-pipeline.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels that select this release's pods; never change them after the first install. */}}
{{- define "kp-pipeline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kp-pipeline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kp-pipeline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kp-pipeline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kp-pipeline
{{- end -}}

{{/* Image reference: the tag defaults to <appVersion>-cpu, or -gpu with gpu.enabled. */}}
{{- define "kp-pipeline.image" -}}
{{- $flavour := ternary "gpu" "cpu" .Values.gpu.enabled -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavour) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/*
The partition ceiling. Kafka's group protocol gives each partition to one member of the
group, so replicas beyond the input topic's partition count sit idle: refuse to render a
release that asks for them, unless keda.allowIdleConsumers says that is intended.
*/}}
{{- define "kp-pipeline.checks" -}}
{{- $partitions := int .Values.kafka.partitions -}}
{{- $workers := int .Values.workers -}}
{{- if .Values.keda.enabled -}}
{{- $min := int .Values.keda.minReplicaCount -}}
{{- $max := int .Values.keda.maxReplicaCount -}}
{{- if gt $min $max -}}
{{- fail (printf "keda.minReplicaCount (%d) is above keda.maxReplicaCount (%d)" $min $max) -}}
{{- end -}}
{{- if and (gt (mul $max $workers) $partitions) (not .Values.keda.allowIdleConsumers) -}}
{{- if gt $workers 1 -}}
{{- fail (printf "keda.maxReplicaCount (%d) x workers (%d) exceeds kafka.partitions (%d): each worker is a consumer of the group, and each partition goes to one of them, so consumers beyond the partition count sit idle. Lower keda.maxReplicaCount or workers, add partitions to the topic (and raise kafka.partitions), or set keda.allowIdleConsumers=true." $max $workers $partitions) -}}
{{- end -}}
{{- fail (printf "keda.maxReplicaCount (%d) exceeds kafka.partitions (%d): each partition goes to one consumer of the group, so replicas beyond the partition count sit idle. Lower keda.maxReplicaCount, add partitions to the topic (and raise kafka.partitions), or set keda.allowIdleConsumers=true." $max $partitions) -}}
{{- end -}}
{{- else if gt (mul (int .Values.replicaCount) $workers) $partitions -}}
{{- if gt $workers 1 -}}
{{- fail (printf "replicaCount (%d) x workers (%d) exceeds kafka.partitions (%d): each worker is a consumer of the group, so consumers beyond the partition count sit idle." (int .Values.replicaCount) $workers $partitions) -}}
{{- end -}}
{{- fail (printf "replicaCount (%d) exceeds kafka.partitions (%d): each partition goes to one consumer of the group, so replicas beyond the partition count sit idle." (int .Values.replicaCount) $partitions) -}}
{{- end -}}
{{- if .Values.replay.enabled -}}
{{- if not (or .Values.replay.to .Values.replay.toOffset) -}}
{{- fail "replay.to or replay.toOffset: a replay shared between pods needs a fixed end (each pod resolves the range itself; an open end is wherever each one looked)" -}}
{{- end -}}
{{- if eq .Values.replay.output .Values.kafka.outputTopic .Values.kafka.topic -}}
{{- fail "replay.output: must not be a live topic" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The cluster's security, from values and Secrets, as the KP_* variables the topology reads
(kafka.security in the default topology). Credentials come from Kubernetes Secrets
through secretKeyRef and certificate files from a Secret volume: never from values that
end up in the ConfigMap.
*/}}
{{- define "kp-pipeline.securityEnv" -}}
{{- $sec := .Values.kafka.security -}}
- name: KP_SECURITY_PROTOCOL
  value: {{ $sec.protocol | quote }}
{{- with $sec.saslMechanism }}
- name: KP_SASL_MECHANISM
  value: {{ . | quote }}
{{- end }}
{{- if $sec.saslSecret.name }}
- name: KP_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $sec.saslSecret.name | quote }}
      key: {{ $sec.saslSecret.usernameKey | quote }}
- name: KP_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sec.saslSecret.name | quote }}
      key: {{ $sec.saslSecret.passwordKey | quote }}
{{- end }}
{{- if $sec.tlsSecret.name }}
- name: KP_SSL_CA_LOCATION
  value: {{ printf "/etc/kp-pipeline-tls/%s" $sec.tlsSecret.caKey | quote }}
{{- if $sec.tlsSecret.mutual }}
- name: KP_SSL_CERTIFICATE_LOCATION
  value: {{ printf "/etc/kp-pipeline-tls/%s" $sec.tlsSecret.certKey | quote }}
- name: KP_SSL_KEY_LOCATION
  value: {{ printf "/etc/kp-pipeline-tls/%s" $sec.tlsSecret.keyKey | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The TLS Secret's files, mounted read-only beside (not inside) the topology. */}}
{{- define "kp-pipeline.securityMounts" -}}
{{- if .Values.kafka.security.tlsSecret.name }}
- name: kafka-tls
  mountPath: /etc/kp-pipeline-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "kp-pipeline.securityVolumes" -}}
{{- if .Values.kafka.security.tlsSecret.name }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.security.tlsSecret.name | quote }}
    defaultMode: 0400
{{- end }}
{{- end -}}
