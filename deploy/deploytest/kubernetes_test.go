package deploytest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

const namespace = "flowbus"

// object is one decoded manifest document.
type object struct {
	file string
	kind string
	meta *metav1.ObjectMeta
	obj  any
}

func (o object) String() string { return fmt.Sprintf("%s: %s %s", o.file, o.kind, o.meta.Name) }

var docSep = regexp.MustCompile(`(?m)^---[ \t]*$`)

// newObject maps apiVersion/kind to the typed API object. Only kinds the
// manifests are meant to hold are accepted.
func newObject(apiVersion, kind string) (any, *metav1.ObjectMeta, bool) {
	switch apiVersion + "/" + kind {
	case "v1/Namespace":
		o := &corev1.Namespace{}
		return o, &o.ObjectMeta, true
	case "v1/ServiceAccount":
		o := &corev1.ServiceAccount{}
		return o, &o.ObjectMeta, true
	case "v1/ConfigMap":
		o := &corev1.ConfigMap{}
		return o, &o.ObjectMeta, true
	case "v1/Service":
		o := &corev1.Service{}
		return o, &o.ObjectMeta, true
	case "v1/PersistentVolumeClaim":
		o := &corev1.PersistentVolumeClaim{}
		return o, &o.ObjectMeta, true
	case "apps/v1/DaemonSet":
		o := &appsv1.DaemonSet{}
		return o, &o.ObjectMeta, true
	case "apps/v1/Deployment":
		o := &appsv1.Deployment{}
		return o, &o.ObjectMeta, true
	case "apps/v1/StatefulSet":
		o := &appsv1.StatefulSet{}
		return o, &o.ObjectMeta, true
	case "policy/v1/PodDisruptionBudget":
		o := &policyv1.PodDisruptionBudget{}
		return o, &o.ObjectMeta, true
	}
	return nil, nil, false
}

// loadManifests strictly decodes every document of deploy/kubernetes/*.yaml:
// unknown or misspelt fields, duplicate keys and values of the wrong type
// (a quantity that does not parse, a string for an integer) are errors.
func loadManifests(t *testing.T) []object {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(root(t), "deploy", "kubernetes", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes (%v)", err)
	}
	var objs []object
	for _, f := range files {
		rel, _ := filepath.Rel(root(t), f)
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSep.Split(string(b), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Errorf("%s document %d: %v", rel, i+1, err)
				continue
			}
			obj, meta, ok := newObject(tm.APIVersion, tm.Kind)
			if !ok {
				t.Errorf("%s document %d: unexpected apiVersion %q kind %q", rel, i+1, tm.APIVersion, tm.Kind)
				continue
			}
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Errorf("%s document %d (%s): %v", rel, i+1, tm.Kind, err)
				continue
			}
			objs = append(objs, object{file: rel, kind: tm.Kind, meta: meta, obj: obj})
		}
	}
	return objs
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func TestKubernetesManifests(t *testing.T) {
	objs := loadManifests(t)
	if t.Failed() {
		return
	}
	vars := agentVariables(t)
	configMaps := map[string]*corev1.ConfigMap{}
	seen := map[string]bool{}
	var pods []podOf
	for _, o := range objs {
		key := o.kind + "/" + o.meta.Name
		if seen[key] {
			t.Errorf("%s: defined twice", o)
		}
		seen[key] = true
		for _, msg := range validation.IsDNS1123Subdomain(o.meta.Name) {
			t.Errorf("%s: name: %s", o, msg)
		}
		if o.kind == "Namespace" {
			if o.meta.Name != namespace {
				t.Errorf("%s: the namespace is %s", o, namespace)
			}
		} else if o.meta.Namespace != namespace {
			t.Errorf("%s: namespace %q, want %q", o, o.meta.Namespace, namespace)
		}
		checkLabels(t, o.String(), o.meta.Labels)
		switch v := o.obj.(type) {
		case *corev1.ConfigMap:
			configMaps[v.Name] = v
			for k := range v.Data {
				checkVariable(t, vars, o.String(), k)
			}
		case *appsv1.DaemonSet:
			pods = append(pods, podOf{o, v.Spec.Selector, &v.Spec.Template})
		case *appsv1.Deployment:
			pods = append(pods, podOf{o, v.Spec.Selector, &v.Spec.Template})
			if v.Spec.Replicas == nil {
				t.Errorf("%s: replicas not set", o)
			}
		case *appsv1.StatefulSet:
			pods = append(pods, podOf{o, v.Spec.Selector, &v.Spec.Template})
			if v.Spec.ServiceName == "" || !seen["Service/"+v.Spec.ServiceName] && !defines(objs, "Service", v.Spec.ServiceName) {
				t.Errorf("%s: serviceName %q is not a Service of the manifests", o, v.Spec.ServiceName)
			}
		}
	}
	for _, p := range pods {
		checkPod(t, p, configMaps, vars)
	}
	for _, o := range objs {
		switch v := o.obj.(type) {
		case *corev1.Service:
			checkService(t, o, v, pods)
		case *policyv1.PodDisruptionBudget:
			if !selectsAny(t, o.String(), v.Spec.Selector, pods) {
				t.Errorf("%s: its selector matches no pod template", o)
			}
		}
	}
	for _, want := range []string{"DaemonSet/flowagent", "ConfigMap/flowagent-config", "Deployment/flowstat", "StatefulSet/nats", "ConfigMap/nats-config"} {
		if !seen[want] {
			t.Errorf("the manifests define no %s", want)
		}
	}
}

func defines(objs []object, kind, name string) bool {
	for _, o := range objs {
		if o.kind == kind && o.meta.Name == name {
			return true
		}
	}
	return false
}

func checkLabels(t *testing.T, where string, l map[string]string) {
	t.Helper()
	for k, v := range l {
		for _, msg := range validation.IsQualifiedName(k) {
			t.Errorf("%s: label key %q: %s", where, k, msg)
		}
		for _, msg := range validation.IsValidLabelValue(v) {
			t.Errorf("%s: label %s=%q: %s", where, k, v, msg)
		}
	}
}

type podOf struct {
	o        object
	selector *metav1.LabelSelector
	tmpl     *corev1.PodTemplateSpec
}

func selectsAny(t *testing.T, where string, sel *metav1.LabelSelector, pods []podOf) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Errorf("%s: selector: %v", where, err)
		return true
	}
	for _, p := range pods {
		if !s.Empty() && s.Matches(labels.Set(p.tmpl.Labels)) {
			return true
		}
	}
	return false
}

// checkPod checks what the API server would refuse or what would fail at
// run time: selectors, references between volumes, mounts, config maps,
// probes and ports, resources, security context, and FLOWBUS_* names.
func checkPod(t *testing.T, p podOf, configMaps map[string]*corev1.ConfigMap, vars map[string]bool) {
	t.Helper()
	where := p.o.String()
	sel, err := metav1.LabelSelectorAsSelector(p.selector)
	if err != nil || sel.Empty() {
		t.Errorf("%s: selector missing or invalid (%v)", where, err)
	} else if !sel.Matches(labels.Set(p.tmpl.Labels)) {
		t.Errorf("%s: the selector does not match the pod template's labels", where)
	}
	checkLabels(t, where+" template", p.tmpl.Labels)
	spec := &p.tmpl.Spec
	volumes := map[string]*corev1.Volume{}
	for i := range spec.Volumes {
		v := &spec.Volumes[i]
		if volumes[v.Name] != nil {
			t.Errorf("%s: volume %s defined twice", where, v.Name)
		}
		volumes[v.Name] = v
		if v.ConfigMap != nil && configMaps[v.ConfigMap.Name] == nil {
			t.Errorf("%s: volume %s: ConfigMap %s is not in the manifests", where, v.Name, v.ConfigMap.Name)
		}
	}
	if ss, ok := p.o.obj.(*appsv1.StatefulSet); ok {
		for _, c := range ss.Spec.VolumeClaimTemplates {
			volumes[c.Name] = &corev1.Volume{Name: c.Name}
		}
	}
	if len(spec.Containers) == 0 {
		t.Errorf("%s: no containers", where)
	}
	for _, c := range append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...) {
		cw := where + " container " + c.Name
		if c.Image == "" {
			t.Errorf("%s: no image", cw)
		}
		if c.Resources.Limits.Memory().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Requests.Cpu().IsZero() {
			t.Errorf("%s: set memory and cpu requests and a memory limit", cw)
		}
		for _, m := range c.VolumeMounts {
			if volumes[m.Name] == nil {
				t.Errorf("%s: mount of undefined volume %s", cw, m.Name)
			}
		}
		ports := map[string]bool{}
		for _, pt := range c.Ports {
			if pt.Name != "" {
				for _, msg := range validation.IsValidPortName(pt.Name) {
					t.Errorf("%s: port name %q: %s", cw, pt.Name, msg)
				}
				ports[pt.Name] = true
			}
		}
		for name, pr := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
			if pr != nil && pr.HTTPGet != nil && pr.HTTPGet.Port.StrVal != "" && !ports[pr.HTTPGet.Port.StrVal] {
				t.Errorf("%s: %s probe uses port %q, which the container does not name", cw, name, pr.HTTPGet.Port.StrVal)
			}
		}
		defined := map[string]bool{}
		for _, ef := range c.EnvFrom {
			if ef.ConfigMapRef != nil {
				cm := configMaps[ef.ConfigMapRef.Name]
				if cm == nil {
					t.Errorf("%s: envFrom ConfigMap %s is not in the manifests", cw, ef.ConfigMapRef.Name)
					continue
				}
				for k := range cm.Data {
					defined[k] = true
				}
			}
		}
		for _, e := range c.Env {
			checkVariable(t, vars, cw, e.Name)
			for _, ref := range regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).FindAllStringSubmatch(e.Value, -1) {
				if !defined[ref[1]] {
					t.Errorf("%s: %s refers to $(%s), which is not defined before it", cw, e.Name, ref[1])
				}
			}
			defined[e.Name] = true
			if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil && configMaps[e.ValueFrom.ConfigMapKeyRef.Name] == nil {
				t.Errorf("%s: %s: ConfigMap %s is not in the manifests", cw, e.Name, e.ValueFrom.ConfigMapKeyRef.Name)
			}
		}
		sc := c.SecurityContext
		if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: set allowPrivilegeEscalation: false and readOnlyRootFilesystem: true", cw)
		}
		if sc != nil && sc.Privileged != nil && *sc.Privileged {
			t.Errorf("%s: privileged: capabilities suffice", cw)
		}
		if sc == nil || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: drop ALL capabilities and add back what is needed", cw)
		}
	}
	if ds, ok := p.o.obj.(*appsv1.DaemonSet); ok {
		checkAgentDaemonSet(t, where, ds, configMaps)
	}
}

// checkAgentDaemonSet checks what the agent needs to work in a pod.
func checkAgentDaemonSet(t *testing.T, where string, ds *appsv1.DaemonSet, configMaps map[string]*corev1.ConfigMap) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if len(spec.Tolerations) == 0 {
		t.Errorf("%s: no tolerations: the agent would miss tainted nodes", where)
	}
	c := spec.Containers[0]
	allowed := []corev1.Capability{"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}
	for _, add := range c.SecurityContext.Capabilities.Add {
		if !slices.Contains(allowed, add) {
			t.Errorf("%s: capability %s is more than the agent needs (%v)", where, add, allowed)
		}
	}
	for _, need := range allowed[:3] {
		if !slices.Contains(c.SecurityContext.Capabilities.Add, need) {
			t.Errorf("%s: capability %s is missing", where, need)
		}
	}
	env := map[string]string{}
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef != nil && configMaps[ef.ConfigMapRef.Name] != nil {
			for k, v := range configMaps[ef.ConfigMapRef.Name].Data {
				env[k] = v
			}
		}
	}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	cg := env["FLOWBUS_CGROUP_PATH"]
	if cg == "" {
		t.Fatalf("%s: FLOWBUS_CGROUP_PATH is not set: the agent would watch its own cgroup namespace", where)
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	var cgroupMounted, bpffs bool
	for _, m := range c.VolumeMounts {
		hp := hostPaths[m.Name]
		if m.MountPath == cg && (hp == "/sys/fs/cgroup" || hp == "/sys/fs/cgroup/unified") {
			cgroupMounted = true
			if !m.ReadOnly {
				t.Errorf("%s: mount the host cgroup file system read-only", where)
			}
		}
		if hp == "/sys/fs/bpf" {
			bpffs = true
		}
	}
	if !cgroupMounted {
		t.Errorf("%s: FLOWBUS_CGROUP_PATH=%s is not the host's cgroup v2 file system mounted from a hostPath", where, cg)
	}
	if !bpffs {
		t.Errorf("%s: the BPF file system is not mounted", where)
	}
	if url := env["FLOWBUS_NATS_URL"]; url == "" {
		t.Errorf("%s: FLOWBUS_NATS_URL is empty: every agent would start its own embedded server", where)
	}
	if !strings.Contains(env["FLOWBUS_METRICS_ADDR"], ":9464") {
		t.Errorf("%s: FLOWBUS_METRICS_ADDR %q does not match the metrics port 9464", where, env["FLOWBUS_METRICS_ADDR"])
	}
}

func checkService(t *testing.T, o object, s *corev1.Service, pods []podOf) {
	t.Helper()
	sel := labels.SelectorFromSet(s.Spec.Selector)
	var matched []podOf
	for _, p := range pods {
		if len(s.Spec.Selector) > 0 && sel.Matches(labels.Set(p.tmpl.Labels)) {
			matched = append(matched, p)
		}
	}
	if len(matched) == 0 {
		t.Errorf("%s: its selector matches no pod template", o)
		return
	}
	for _, sp := range s.Spec.Ports {
		if sp.TargetPort.StrVal == "" {
			continue
		}
		found := false
		for _, p := range matched {
			for _, c := range p.tmpl.Spec.Containers {
				for _, cp := range c.Ports {
					found = found || cp.Name == sp.TargetPort.StrVal
				}
			}
		}
		if !found {
			t.Errorf("%s: targetPort %q is not a container port name", o, sp.TargetPort.StrVal)
		}
	}
}

// TestKustomization checks that kustomization.yaml lists every manifest.
func TestKustomization(t *testing.T) {
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Namespace  string   `json:"namespace"`
		Resources  []string `json:"resources"`
	}
	if err := yaml.UnmarshalStrict(read(t, "deploy/kubernetes/kustomization.yaml"), &k); err != nil {
		t.Fatal(err)
	}
	if k.Kind != "Kustomization" || k.Namespace != namespace {
		t.Errorf("kustomization.yaml: kind %q namespace %q", k.Kind, k.Namespace)
	}
	files, _ := filepath.Glob(filepath.Join(root(t), "deploy", "kubernetes", "*.yaml"))
	for _, f := range files {
		if b := filepath.Base(f); b != "kustomization.yaml" && !slices.Contains(k.Resources, b) {
			t.Errorf("kustomization.yaml does not list %s", b)
		}
	}
	for _, r := range k.Resources {
		if _, err := os.Stat(filepath.Join(root(t), "deploy", "kubernetes", r)); err != nil {
			t.Errorf("kustomization.yaml: %v", err)
		}
	}
}

// TestNATSConfigMapMatchesFiles keeps the ConfigMap of nats.yaml and the
// reference files of deploy/nats identical.
func TestNATSConfigMapMatchesFiles(t *testing.T) {
	for _, o := range loadManifests(t) {
		cm, ok := o.obj.(*corev1.ConfigMap)
		if !ok || cm.Name != "nats-config" {
			continue
		}
		for key, file := range map[string]string{"nats.conf": "deploy/nats/cluster.conf", "accounts.conf": "deploy/nats/accounts.conf"} {
			if !bytes.Equal([]byte(cm.Data[key]), read(t, file)) {
				t.Errorf("ConfigMap nats-config key %s differs from %s: copy the file into deploy/kubernetes/nats.yaml (indented 4 spaces)", key, file)
			}
		}
		return
	}
	t.Fatal("no ConfigMap nats-config in deploy/kubernetes")
}
