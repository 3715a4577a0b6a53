{{/* Names and labels. */}}
{{- define "loragate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loragate.fullname" -}}
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

{{- define "loragate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "loragate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loragate
{{- end }}

{{/* Selector labels of one component: include "loragate.selectorLabels" (list . "gateway") */}}
{{- define "loragate.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "loragate.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "loragate.componentLabels" -}}
{{ include "loragate.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "loragate.routesConfigMap" -}}
{{ include "loragate.fullname" . }}-routes
{{- end }}

{{- define "loragate.engineName" -}}
{{ include "loragate.fullname" . }}-engine
{{- end }}

{{/* The vLLM replicas: the engine's headless Service, whose addresses the gateways re-resolve at every
health interval (DNS discovery: scaling the engine needs no new release), or gateway.upstreams. */}}
{{- define "loragate.upstreams" -}}
{{- if .Values.engine.enabled }}
{{- $engine := include "loragate.engineName" . }}
{{- printf "http://%s.%s.svc:%d" $engine .Release.Namespace (int .Values.engine.port) }}
{{- else }}
{{- required "gateway.upstreams must list vLLM URLs when engine.enabled is false" (join "," .Values.gateway.upstreams) }}
{{- end }}
{{- end }}

{{/* Shared per-key limits: "internal" (a Redis in the release) or "external" when auth is on, else "". */}}
{{- define "loragate.limitsRedis" -}}
{{- if and .Values.auth.enabled (ne .Values.limits.redis.mode "none") }}{{ .Values.limits.redis.mode }}{{ end }}
{{- end }}

{{- define "loragate.redisName" -}}
{{ include "loragate.fullname" . }}-redis
{{- end }}

{{/* The gateways' LORAGATE_LIMITS_* env (empty without shared limits). */}}
{{- define "loragate.limitsEnv" -}}
{{- $mode := include "loragate.limitsRedis" . }}
{{- if $mode }}
{{- $redis := .Values.limits.redis }}
{{- if eq $mode "internal" }}
- {name: LORAGATE_LIMITS_URL, value: {{ printf "redis://%s.%s.svc:6379/0" (include "loragate.redisName" .) .Release.Namespace | quote }}}
{{- else }}
- {name: LORAGATE_LIMITS_URL, value: {{ required "limits.redis.url is required when limits.redis.mode is external" $redis.url | quote }}}
{{- end }}
- {name: LORAGATE_LIMITS_FAIL_CLOSED, value: {{ $redis.failClosed | quote }}}
{{- with $redis.passwordSecret.name }}
- name: LORAGATE_LIMITS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $redis.passwordSecret.key | quote }}}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the Prometheus Operator resources are rendered. */}}
{{- define "loragate.prometheusOperator" -}}
{{- $mode := .Values.metrics.prometheusOperator }}
{{- if eq (toString $mode) "auto" }}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- else if $mode }}true
{{- end }}
{{- end }}

{{- define "loragate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "loragate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end }}

{{- define "loragate.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The request log: env of the gateway and the monitor (they read and write the same place). */}}
{{- define "loragate.requestLogEnv" -}}
{{- with .Values.requestLog }}
{{- if .enabled }}
- {name: LORAGATE_REQUEST_LOG_URL, value: {{ .url | default .mountPath | quote }}}
- {name: LORAGATE_REQUEST_LOG_TEXT, value: {{ .text | quote }}}
{{- with .s3Endpoint }}
- {name: LORAGATE_REQUEST_LOG_S3_ENDPOINT, value: {{ . | quote }}}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "loragate.requestLogEnvFrom" -}}
{{- if and .Values.requestLog.enabled .Values.requestLog.credentialsSecret }}
envFrom:
  - secretRef:
      name: {{ .Values.requestLog.credentialsSecret }}
{{- end }}
{{- end }}

{{/* "true" when the request log lives on a shared claim (not object storage). */}}
{{- define "loragate.requestLogClaim" -}}
{{- if and .Values.requestLog.enabled (not .Values.requestLog.url) }}true{{ end }}
{{- end }}

{{/* The monitor's config file (monitoring/service.py MonitorConfig), rendered from monitor.* values. */}}
{{- define "loragate.monitorConfig" -}}
{{- $m := .Values.monitor }}
{{- if and $m.checks (not .Values.requestLog.enabled) }}
{{- fail "monitor.checks read the request log: set requestLog.enabled (with requestLog.url or requestLog.existingClaim)" }}
{{- end }}
{{- $pipelines := list }}
{{- range $check := $m.checks }}
{{- range $action := $check.actions | default list }}
{{- if and (eq $action.type "webhook") (not $m.webhookSecret.existingSecret) }}
{{- fail (printf "check %s: a webhook action needs monitor.webhookSecret.existingSecret" $check.route) }}
{{- end }}
{{- if and (eq $action.type "webhook") (ne $action.secret_env $m.webhookSecret.env) }}
{{- fail (printf "check %s: webhook secret_env must be %s (monitor.webhookSecret.env)" $check.route $m.webhookSecret.env) }}
{{- end }}
{{- if and (eq $action.type "k8s_job") (ne ($action.namespace | default "default") $.Release.Namespace) }}
{{- fail (printf "check %s: k8s_job namespace must be %s (the monitor's Role creates Jobs in the release namespace only)" $check.route $.Release.Namespace) }}
{{- end }}
{{- if and (eq $action.type "k8s_job") (eq (toString $action.template) "/etc/loragate/training-job.yaml") (not $m.training.enabled) }}
{{- fail (printf "check %s: the k8s_job action uses /etc/loragate/training-job.yaml: set monitor.training.enabled" $check.route) }}
{{- end }}
{{- if eq $action.type "pipeline" }}
{{- $pipelines = append $pipelines $check.route }}
{{- end }}
{{- if and (eq $action.type "k8s_job") (eq (toString $action.template) "/etc/loragate/retrain-job.yaml") (not $m.retrainJobTemplate) }}
{{- fail (printf "check %s: the k8s_job action uses /etc/loragate/retrain-job.yaml: set monitor.retrainJobTemplate" $check.route) }}
{{- end }}
{{- end }}
{{- end }}
{{- $config := dict "request_log" (.Values.requestLog.url | default .Values.requestLog.mountPath)
      "output_dir" (printf "%s/reports" $m.dataDir) "state_file" (printf "%s/state.json" $m.dataDir)
      "interval_s" $m.intervalSeconds "host" "0.0.0.0" "port" $m.port "drift" $m.drift "checks" $m.checks }}
{{- with $m.prometheusUrl }}
{{- $_ := set $config "prometheus_url" . }}
{{- end }}
{{- with (include "loragate.adapterRegistry" .) }}
{{- $_ := set $config "adapter_registry" . }}
{{- end }}
{{- if and $pipelines (not $m.prometheusUrl) }}
{{- fail (printf "check %s: a pipeline action rolls the new version out (canary analysis from Prometheus): set monitor.prometheusUrl" (first $pipelines)) }}
{{- end }}
{{- if or $m.rollouts $pipelines }}
{{- if not $m.prometheusUrl }}
{{- fail "monitor.rollouts analyse canaries from Prometheus: set monitor.prometheusUrl" }}
{{- end }}
{{- $source := dict "name" (include "loragate.routesConfigMap" .) "namespace" .Release.Namespace "key" "routes.yaml" }}
{{- $_ := set $config "rollouts" (dict "configmap" $source "state_file" (printf "%s/rollouts.json" $m.dataDir) "canaries" ($m.rollouts | default list)) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The claim of the monitor's data directory ("" when it is an emptyDir). */}}
{{- define "loragate.monitorClaim" -}}
{{- with .Values.monitor.persistence }}
{{- if .enabled }}{{ .existingClaim | default (printf "%s-monitor" (include "loragate.fullname" $)) }}{{ end }}
{{- end }}
{{- end }}

{{/* The adapter registry the monitor reads cards from ("" when none). */}}
{{- define "loragate.adapterRegistry" -}}
{{- $m := .Values.monitor }}
{{- $m.adapterRegistry | default (ternary $m.training.registry.mountPath "" $m.training.enabled) }}
{{- end }}

{{/* The training Job template (batch/v1) for k8s_job actions: `loragate pipeline run` (train -> gate)
with the monitor's image on a GPU node; ${route}, ${run_id}, ${dataset} are filled by the monitor. */}}
{{- define "loragate.trainingJob" -}}
{{- $t := .Values.monitor.training }}
{{- $reg := $t.registry.mountPath }}
{{- $image := $t.image.repository | default .Values.image.monitor.repository }}
{{- $tag := $t.image.tag | default .Values.image.monitor.tag | default .Chart.AppVersion }}
{{- $engine := printf "%s-engine" (include "loragate.fullname" .) }}
{{- $evaluation := $t.evaluationEngine | default (printf "http://%s-0.%s.%s.svc:%v" $engine $engine .Release.Namespace .Values.engine.port) }}
apiVersion: batch/v1
kind: Job
metadata:
  generateName: {{ include "loragate.fullname" . }}-train-
  labels:
    {{- include "loragate.componentLabels" (list . "training") | nindent 4 }}
spec:
  backoffLimit: {{ $t.backoffLimit }}
  activeDeadlineSeconds: {{ $t.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "loragate.componentLabels" (list . "training") | nindent 8 }}
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: {{ $t.terminationGracePeriodSeconds }}
      automountServiceAccountToken: false
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "loragate.podSecurityContext" . | nindent 8 }}
      containers:
        - name: train
          image: "{{ $image }}:{{ $tag }}"
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command: ["loragate"]
          args:
            - pipeline
            - run
            - --state-file={{ $reg }}/pipelines/${route}-${run_id}.json
            - --route=${route}
            - --dataset=${dataset}
            - --base-model={{ $t.baseModel }}
            - --registry={{ $reg }}
            - --name=${route}
            - --version=r${run_id}
            - --stable={{ $reg }}/${route}/{{ $t.stable }}
            - --engine={{ $evaluation }}
            - --train-arg=--checkpoint-every={{ $t.checkpointEvery }}
            {{- if gt (int $t.gpus) 1 }}
            - --train-arg=--processes={{ $t.gpus }}
            {{- end }}
            {{- range $t.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - {name: HOME, value: /tmp}
            - {name: HF_HOME, value: /tmp/hf}
            {{- range $key, $value := $t.env }}
            - {name: {{ $key }}, value: {{ $value | quote }}}
            {{- end }}
          resources:
            requests:
              {{- toYaml (merge (dict "nvidia.com/gpu" (int $t.gpus)) ($t.resources.requests | default dict)) | nindent 14 }}
            limits:
              {{- toYaml (merge (dict "nvidia.com/gpu" (int $t.gpus)) ($t.resources.limits | default dict)) | nindent 14 }}
          securityContext:
            {{- include "loragate.containerSecurityContext" . | nindent 12 }}
          volumeMounts:
            - {name: registry, mountPath: {{ $reg }}}
            {{- if gt (int $t.gpus) 1 }}
            - {name: shm, mountPath: /dev/shm}  # NCCL between the processes
            {{- end }}
            {{- if $t.models.existingClaim }}
            - {name: models, mountPath: {{ $t.models.mountPath }}, readOnly: true}
            {{- end }}
            - {name: tmp, mountPath: /tmp}
      volumes:
        - name: registry
          persistentVolumeClaim:
            claimName: {{ $t.registry.existingClaim }}
        {{- if $t.models.existingClaim }}
        - name: models
          persistentVolumeClaim:
            claimName: {{ $t.models.existingClaim }}
            readOnly: true
        {{- end }}
        - name: tmp
          emptyDir: {sizeLimit: 20Gi}
        {{- if gt (int $t.gpus) 1 }}
        - name: shm
          emptyDir: {medium: Memory, sizeLimit: 16Gi}
        {{- end }}
      {{- with $t.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $t.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $t.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* "true" when a component's KEDA ScaledObject is rendered: (list $ .Values.<component>.keda).
"auto" renders it where the cluster serves keda.sh/v1alpha1; true/false force it. */}}
{{- define "loragate.keda" -}}
{{- $root := index . 0 }}
{{- $mode := (index . 1).enabled }}
{{- if eq (toString $mode) "auto" }}
{{- if $root.Capabilities.APIVersions.Has "keda.sh/v1alpha1" }}true{{ end }}
{{- else if $mode }}true
{{- end }}
{{- end }}
