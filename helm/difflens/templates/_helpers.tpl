{{/*
Names. Object names are `<fullname>-<component>[-<model>]`; the fullname is cut to 40 characters so that a
Service name (`<fullname>-worker`, `<fullname>-redis`) stays a DNS label.
*/}}
{{- define "difflens.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "difflens.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := .Values.nameOverride | default .Chart.Name -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "difflens.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A model's worker Deployment (and its ScaledObject / HPA). dict: root, model (the entry). */}}
{{- define "difflens.workerName" -}}
{{- printf "%s-worker-%s" (include "difflens.fullname" .root) .model.name -}}
{{- end -}}

{{/*
Labels. dict: root, component (front | worker | redis | ensure-groups), model (optional, a worker's name).
Selector labels are the immutable subset: name, instance, component (and the model of a worker).
*/}}
{{- define "difflens.selectorLabels" -}}
app.kubernetes.io/name: {{ include "difflens.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .model }}
difflens/model: {{ . }}
{{- end }}
{{- end -}}

{{- define "difflens.labels" -}}
{{ include "difflens.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: difflens
helm.sh/chart: {{ include "difflens.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of an object that belongs to the whole release (ServiceAccount, Secret, TriggerAuthentication). */}}
{{- define "difflens.releaseLabels" -}}
app.kubernetes.io/name: {{ include "difflens.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: difflens
helm.sh/chart: {{ include "difflens.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod labels: the labels plus the global and the component's podLabels. dict: root, component, model, own. */}}
{{- define "difflens.podLabels" -}}
{{ include "difflens.labels" . }}
{{- $extra := mergeOverwrite (deepCopy (.root.Values.podLabels | default dict)) (.own | default dict) }}
{{- with $extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
An image reference. dict: root, image (the component's {repository, tag, digest}). The tag defaults to image.tag,
then the chart's appVersion; a digest wins over both.
*/}}
{{- define "difflens.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "difflens.pullPolicy" -}}
{{- .image.pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{- define "difflens.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "difflens.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Security contexts: the component's own merged over the global one. dict: root, own. */}}
{{- define "difflens.podSecurityContext" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.podSecurityContext) (deepCopy (.own | default dict))) -}}
{{- end -}}

{{- define "difflens.securityContext" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.securityContext) (deepCopy (.own | default dict))) -}}
{{- end -}}

{{/*
The pod-spec fields every pod of the chart shares. dict: root, own (the component's values: nodeSelector,
tolerations, affinity, runtimeClassName, priorityClassName, podSecurityContext), extraNodeSelector,
extraTolerations (GPU ones), runtimeClassName (wins when set).
*/}}
{{- define "difflens.podCommon" -}}
{{- $root := .root -}}
{{- $own := .own -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
serviceAccountName: {{ include "difflens.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
securityContext:
  {{- include "difflens.podSecurityContext" (dict "root" $root "own" $own.podSecurityContext) | nindent 2 }}
{{- $nodeSelector := mergeOverwrite (deepCopy ($root.Values.nodeSelector | default dict)) (deepCopy ($own.nodeSelector | default dict)) (deepCopy (.extraNodeSelector | default dict)) }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := concat ($root.Values.tolerations | default list) ($own.tolerations | default list) (.extraTolerations | default list) }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($own.affinity | default $root.Values.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.runtimeClassName | default $own.runtimeClassName | default $root.Values.runtimeClassName) }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $own.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/*
Redis: where the pods and KEDA find it. Three modes: the chart's own Redis (redis.deploy.enabled), an external URL
given in values (the chart makes the Secret), an existing Secret (the default).
*/}}
{{- define "difflens.redis.chartSecret" -}}
{{- if or .Values.redis.deploy.enabled .Values.redis.external.url -}}true{{- end -}}
{{- end -}}

{{- define "difflens.redis.secretName" -}}
{{- if include "difflens.redis.chartSecret" . -}}
{{- printf "%s-redis" (include "difflens.fullname" .) -}}
{{- else if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- fail "redis: set redis.external.existingSecret, redis.external.url or redis.deploy.enabled" -}}
{{- end -}}
{{- end -}}

{{- define "difflens.redis.urlKey" -}}
{{- if include "difflens.redis.chartSecret" . -}}redis-url{{- else -}}{{ .Values.redis.external.urlKey }}{{- end -}}
{{- end -}}

{{/* With an external URL: the password given, else the one the URL carries (KEDA needs it apart). */}}
{{- define "difflens.redis.urlPassword" -}}
{{- if .Values.redis.external.password -}}
{{- .Values.redis.external.password -}}
{{- else if .Values.redis.external.url -}}
{{- $userinfo := (urlParse .Values.redis.external.url).userinfo -}}
{{- if contains ":" $userinfo -}}{{- regexReplaceAll "^[^:]*:" $userinfo "" -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret key of the password; empty when Redis has none. */}}
{{- define "difflens.redis.passwordKey" -}}
{{- if .Values.redis.deploy.enabled -}}redis-password
{{- else if .Values.redis.external.url -}}{{- if include "difflens.redis.urlPassword" . -}}redis-password{{- end -}}
{{- else -}}{{ .Values.redis.external.passwordKey }}
{{- end -}}
{{- end -}}

{{/* The chart's Redis listens on 6379; its name is namespace-qualified as the KEDA operator, in a namespace of
its own, resolves it too. */}}
{{- define "difflens.redis.host" -}}
{{- if .Values.redis.deploy.enabled -}}
{{- printf "%s-redis.%s.svc" (include "difflens.fullname" .) .Release.Namespace -}}
{{- else if .Values.redis.external.host -}}
{{- .Values.redis.external.host -}}
{{- else if .Values.redis.external.url -}}
{{- (urlParse .Values.redis.external.url).hostname -}}
{{- end -}}
{{- end -}}

{{- define "difflens.redis.port" -}}
{{- if .Values.redis.deploy.enabled -}}6379
{{- else if not (kindIs "invalid" .Values.redis.external.port) -}}{{ .Values.redis.external.port }}
{{- else if .Values.redis.external.url -}}
{{- $host := (urlParse .Values.redis.external.url).host -}}
{{- if contains ":" $host -}}{{ last (splitList ":" $host) }}{{- else -}}6379{{- end -}}
{{- else -}}6379
{{- end -}}
{{- end -}}

{{- define "difflens.redis.databaseIndex" -}}
{{- if not (kindIs "invalid" .Values.redis.external.databaseIndex) -}}{{ .Values.redis.external.databaseIndex }}
{{- else if and (not .Values.redis.deploy.enabled) .Values.redis.external.url -}}
{{- (urlParse .Values.redis.external.url).path | trimPrefix "/" | default "0" -}}
{{- else -}}0
{{- end -}}
{{- end -}}

{{- define "difflens.redis.enableTLS" -}}
{{- if not (kindIs "invalid" .Values.redis.external.enableTLS) -}}{{ .Values.redis.external.enableTLS }}
{{- else if and (not .Values.redis.deploy.enabled) .Values.redis.external.url -}}
{{- eq (urlParse .Values.redis.external.url).scheme "rediss" -}}
{{- else -}}false
{{- end -}}
{{- end -}}

{{/* The Redis and queue environment of the front, the workers and the hook Job. */}}
{{- define "difflens.redis.env" -}}
- name: DIFFLENS_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "difflens.redis.secretName" . }}
      key: {{ include "difflens.redis.urlKey" . }}
{{- with include "difflens.redis.passwordKey" . }}
- name: DIFFLENS_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "difflens.redis.secretName" $ }}
      key: {{ . }}
{{- end }}
- name: DIFFLENS_QUEUE
  value: {{ .Values.queueName | quote }}
{{- end -}}

{{/*
Capabilities: which API versions and probe kinds the target cluster has (helm template: --kube-version).
*/}}
{{- define "difflens.hpa.apiVersion" -}}
{{- if semverCompare ">=1.23-0" .Capabilities.KubeVersion.Version -}}autoscaling/v2{{- else -}}autoscaling/v2beta2{{- end -}}
{{- end -}}

{{- define "difflens.pdb.apiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{/* Native gRPC probes: beta and on by default from 1.24. */}}
{{- define "difflens.grpcProbes" -}}
{{- if semverCompare ">=1.24-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}

{{/* Container ports: the commands below bind these. */}}
{{- define "difflens.grpcPort" -}}50051{{- end -}}
{{- define "difflens.metricsPort" -}}9090{{- end -}}

{{/*
Model volumes. A model is mounted read-only at /models/<name> from exactly one of pvc, hostPath or image (an init
container of that image copies the folder into an emptyDir). dict: root, models (list), forFront (bool: copy only the
configs and tokenizer files), ownImage (the pod's own image: an image model without repository uses it).
*/}}
{{- define "difflens.modelSource" -}}
{{- $n := 0 -}}
{{- range $k := list "pvc" "hostPath" "image" -}}{{- if hasKey $.model $k -}}{{- $n = add1 $n -}}{{- end -}}{{- end -}}
{{- if ne (int $n) 1 -}}
{{- fail (printf "models[%s]: give exactly one of pvc, hostPath or image" $.model.name) -}}
{{- end -}}
{{- if hasKey .model "pvc" -}}pvc{{- else if hasKey .model "hostPath" -}}hostPath{{- else -}}image{{- end -}}
{{- end -}}

{{- define "difflens.modelVolumes" -}}
{{- range $m := .models }}
{{- $source := include "difflens.modelSource" (dict "model" $m) }}
- name: model-{{ $m.name }}
  {{- if eq $source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
  {{- else if eq $source "hostPath" }}
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
  {{- else if $.forFront }}
  emptyDir:
    sizeLimit: 64Mi
  {{- else if $m.image.sizeLimit }}
  emptyDir:
    sizeLimit: {{ $m.image.sizeLimit }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "difflens.modelMounts" -}}
{{- range $m := .models }}
- name: model-{{ $m.name }}
  mountPath: /models/{{ $m.name }}
  readOnly: true
  {{- if and (hasKey $m "pvc") $m.pvc.subPath }}
  subPath: {{ $m.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
The init containers that copy image models. The front needs only the configs and the tokenizer (*.json, *.txt and
SentencePiece *.model files), never the weights; a worker copies the whole folder. Symbolic links are followed (Hugging Face cache layouts).
*/}}
{{- define "difflens.modelInitContainers" -}}
{{- $root := .root -}}
{{- range $m := .models }}
{{- if hasKey $m "image" }}
- name: model-{{ $m.name }}
  {{- if $m.image.repository }}
  {{- if not (or $m.image.tag $m.image.digest) }}
  {{- fail (printf "models[%s].image: give a tag or a digest with the repository" $m.name) }}
  {{- end }}
  image: {{ include "difflens.image" (dict "root" $root "image" $m.image) }}
  imagePullPolicy: {{ $m.image.pullPolicy | default $root.Values.image.pullPolicy }}
  {{- else }}
  image: {{ $.ownImage }}
  imagePullPolicy: {{ $.ownPullPolicy }}
  {{- end }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      set -eu
      cd "$MODEL_SRC"
      {{- if $.forFront }}
      find -L . -type f \( -name '*.json' -o -name '*.txt' -o -name '*.model' \) | while IFS= read -r f; do
        mkdir -p "$MODEL_DST/$(dirname "$f")"
        cp "$f" "$MODEL_DST/$f"
      done
      {{- else }}
      cp -R -L . "$MODEL_DST/"
      {{- end }}
      test -f "$MODEL_DST/model_index.json" || { echo "no model_index.json under $MODEL_SRC" >&2; exit 1; }
  env:
    - name: MODEL_SRC
      value: {{ $m.image.path | quote }}
    - name: MODEL_DST
      value: /models/{{ $m.name }}
  volumeMounts:
    - name: model-{{ $m.name }}
      mountPath: /models/{{ $m.name }}
  securityContext:
    {{- include "difflens.securityContext" (dict "root" $root "own" $.ownSecurityContext) | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 64Mi
    limits:
      memory: 512Mi
{{- end }}
{{- end }}
{{- end -}}

{{/* `--model NAME=/models/NAME` for each model. */}}
{{- define "difflens.modelArgs" -}}
{{- range $m := . }}
- --model
- {{ printf "%s=/models/%s" $m.name $m.name }}
{{- end }}
{{- end -}}

{{/*
A worker's settings: the model's own entry over worker.*, with presence (not truthiness) deciding, so a model's
`min: 0` or `gpus: 0` wins over a non-zero default. dict: root, model. Returns JSON.
*/}}
{{- define "difflens.worker.settings" -}}
{{- $root := .root -}}
{{- $m := .model -}}
{{- $w := $root.Values.worker -}}
{{- $s := dict "name" $m.name -}}
{{- range $k := list "resources" "affinity" "device" "dtype" "unetBackend" "drainGraceSeconds" "maxStepSeconds" "terminationMarginSeconds" "terminationGracePeriodSeconds" "podAnnotations" -}}
{{- $_ := set $s $k (ternary (index $m $k) (index $w $k) (hasKey $m $k)) -}}
{{- end -}}
{{- $replicas := dict -}}
{{- $own := $m.replicas | default dict -}}
{{- range $k := list "min" "max" "fixed" -}}
{{- $_ := set $replicas $k (ternary (index $own $k) (index $w.replicas $k) (hasKey $own $k)) -}}
{{- end -}}
{{- if gt (int $replicas.min) (int $replicas.max) -}}
{{- fail (printf "models[%s].replicas: min (%v) is above max (%v)" $m.name $replicas.min $replicas.max) -}}
{{- end -}}
{{- $_ := set $s "replicas" $replicas -}}
{{- $gpus := ternary (index $m "gpus") $root.Values.gpu.count (hasKey $m "gpus") -}}
{{- $gpu := and $root.Values.gpu.enabled (gt (int $gpus) 0) -}}
{{- $_ := set $s "gpu" $gpu -}}
{{- $_ := set $s "gpus" (ternary $gpus 0 $gpu) -}}
{{- /* triton: the worker's backend flags; a sidecar takes the pod's GPUs, the worker container then runs on CPU */ -}}
{{- $t := $root.Values.triton -}}
{{- $sidecar := $t.sidecar.enabled -}}
{{- if and $sidecar $t.url -}}
{{- fail "triton: url (an external server) and sidecar.enabled (one in each worker pod) are alternatives; set one" -}}
{{- end -}}
{{- if and $sidecar (not $t.sidecar.modelRepository) -}}
{{- fail "triton.sidecar.modelRepository: the volume holding the Triton model repository (e.g. {persistentVolumeClaim: {claimName: triton-models, readOnly: true}})" -}}
{{- end -}}
{{- $_ := set $s "triton" (or $sidecar (ne $t.url "")) -}}
{{- $_ := set $s "tritonSidecar" $sidecar -}}
{{- $_ := set $s "tritonUrl" (ternary (printf "127.0.0.1:%v" $t.sidecar.grpcPort) $t.url $sidecar) -}}
{{- $_ := set $s "tritonModel" ((index $m "tritonModel") | default $m.name) -}}
{{- if $s.triton -}}{{- $_ := set $s "unetBackend" "triton" -}}{{- end -}}
{{- $workerGpu := and $gpu (not $sidecar) -}}
{{- if and $sidecar (hasPrefix "cuda" ($s.device | default "")) -}}
{{- fail (printf "models[%s]: device %s with triton.sidecar: the pod's GPUs are the Triton container's, the worker runs on cpu" $m.name $s.device) -}}
{{- end -}}
{{- if not $s.device -}}{{- $_ := set $s "device" (ternary "cuda" "cpu" $workerGpu) -}}{{- end -}}
{{- if not $s.dtype -}}{{- $_ := set $s "dtype" (ternary "float16" "float32" $gpu) -}}{{- end -}}
{{- if and (not $gpu) (hasPrefix "cuda" $s.device) -}}
{{- fail (printf "models[%s]: device %s without a GPU (gpu.enabled false or gpus 0)" $m.name $s.device) -}}
{{- end -}}
{{- $res := deepCopy ($s.resources | default dict) -}}
{{- range $part := list "limits" "requests" -}}
{{- if hasKey (index $res $part | default dict) $root.Values.gpu.resourceName -}}
{{- fail (printf "models[%s].resources: leave %s out; the chart sets it from gpu.count / gpus" $m.name $root.Values.gpu.resourceName) -}}
{{- end -}}
{{- end -}}
{{- $tres := deepCopy ($t.sidecar.resources | default dict) -}}
{{- if $gpu -}}
{{- $target := ternary $tres $res $sidecar -}}
{{- $limits := deepCopy (index $target "limits" | default dict) -}}
{{- $_ := set $limits $root.Values.gpu.resourceName (toString $gpus) -}}
{{- $_ := set $target "limits" $limits -}}
{{- end -}}
{{- $_ := set $s "resources" $res -}}
{{- $_ := set $s "tritonResources" $tres -}}
{{- $floor := add $s.drainGraceSeconds $s.maxStepSeconds -}}
{{- $tgps := add $floor $s.terminationMarginSeconds -}}
{{- if not (kindIs "invalid" $s.terminationGracePeriodSeconds) -}}
{{- if le (int $s.terminationGracePeriodSeconds) (int $floor) -}}
{{- fail (printf "models[%s]: terminationGracePeriodSeconds %v must exceed drainGraceSeconds + maxStepSeconds = %v, or SIGKILL cuts a draining worker's last step" $m.name $s.terminationGracePeriodSeconds $floor) -}}
{{- end -}}
{{- $tgps = $s.terminationGracePeriodSeconds -}}
{{- end -}}
{{- $_ := set $s "terminationGracePeriodSeconds" (int $tgps) -}}
{{- $_ := set $s "nodeSelector" (mergeOverwrite (dict) (deepCopy ($w.nodeSelector | default dict)) (ternary (deepCopy ($root.Values.gpu.nodeSelector | default dict)) (dict) $gpu) (deepCopy ($m.nodeSelector | default dict))) -}}
{{- $_ := set $s "tolerations" (concat ($w.tolerations | default list) (ternary ($root.Values.gpu.tolerations | default list) (list) $gpu) ($m.tolerations | default list)) -}}
{{- $_ := set $s "runtimeClassName" ($w.runtimeClassName | default (ternary $root.Values.gpu.runtimeClassName "" $gpu)) -}}
{{- $_ := set $s "extraArgs" (concat ($w.extraArgs | default list) ($m.extraArgs | default list)) -}}
{{- $_ := set $s "extraEnv" (concat ($root.Values.extraEnv | default list) ($w.extraEnv | default list) ($m.extraEnv | default list)) -}}
{{- $_ := set $s "lagCount" (ternary (index $m "lagCount") $root.Values.keda.lagCount (hasKey $m "lagCount")) -}}
{{- $_ := set $s "pendingEntriesCount" (ternary (index $m "pendingEntriesCount") $root.Values.keda.pendingEntriesCount (hasKey $m "pendingEntriesCount")) -}}
{{- toJson $s -}}
{{- end -}}

{{/* The front's terminationGracePeriodSeconds: above its drain grace. */}}
{{- define "difflens.front.terminationGracePeriodSeconds" -}}
{{- $f := .Values.front -}}
{{- if kindIs "invalid" $f.terminationGracePeriodSeconds -}}
{{- add $f.drainGraceSeconds $f.terminationMarginSeconds -}}
{{- else if le (int $f.terminationGracePeriodSeconds) (int $f.drainGraceSeconds) -}}
{{- fail (printf "front.terminationGracePeriodSeconds %v must exceed front.drainGraceSeconds %v" $f.terminationGracePeriodSeconds $f.drainGraceSeconds) -}}
{{- else -}}
{{- $f.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Fails on a front asking for GPUs: the front image has no torch. */}}
{{- define "difflens.front.checkResources" -}}
{{- range $part := list "limits" "requests" -}}
{{- if hasKey (index ($.Values.front.resources | default dict) $part | default dict) $.Values.gpu.resourceName -}}
{{- fail (printf "front.resources: the front never uses a GPU; remove %s" $.Values.gpu.resourceName) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Resources with every quantity a string: server-side apply types a number where a Quantity (a string to the API
server's schema) belongs as an error ("expected string"), so `cpu: 2` must reach the server as "2".
*/}}
{{- define "difflens.resources" -}}
{{- $out := dict -}}
{{- range $part, $quantities := . -}}
{{- if kindIs "map" $quantities -}}
{{- $q := dict -}}
{{- range $name, $value := $quantities -}}{{- $_ := set $q $name (toString $value) -}}{{- end -}}
{{- $_ := set $out $part $q -}}
{{- else -}}
{{- $_ := set $out $part $quantities -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}
