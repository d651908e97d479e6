package deploytest

import "testing"

// TestFlowstatDashboard checks deploy/grafana/flowstat.json like the agent's dashboard: every metric flowstat
// registers is shown, every query names known metrics and applies the job and instance variables, and each
// panel's unit fits what its queries measure.
func TestFlowstatDashboard(t *testing.T) {
	checkDashboard(t, "deploy/grafana/flowstat.json", flowstatMetrics(t))
}
