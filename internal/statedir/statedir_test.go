package statedir

import "testing"

func TestStateDir(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	if d := Dir(env(map[string]string{"STATE_DIRECTORY": "/var/lib/flowstat"})); d != "/var/lib/flowstat" {
		t.Errorf("under systemd: %q", d)
	}
	if d := Dir(env(map[string]string{"STATE_DIRECTORY": "/var/lib/flowbus:/var/lib/other"})); d != "/var/lib/flowbus" {
		t.Errorf("several state directories: %q, want the first", d)
	}
	if d := Dir(env(map[string]string{"XDG_STATE_HOME": "/home/u/.state"})); d != "/home/u/.state/flowbus" {
		t.Errorf("XDG: %q", d)
	}
}
