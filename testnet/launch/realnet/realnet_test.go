package realnet

import "testing"

func TestSumMetric(t *testing.T) {
	text := `# HELP kpnode_peer_penalties_total Peers cut off for breaking a budget.
# TYPE kpnode_peer_penalties_total counter
kpnode_peer_penalties_total{protocol="sync",reason="rounds"} 2
kpnode_peer_penalties_total{protocol="fetch",reason="rate"} 3
kpnode_peer_penalties_total_other 100
kpnode_peer_penalties 7
`
	if got := SumMetric(text, "kpnode_peer_penalties_total"); got != 5 {
		t.Fatalf("sum %v, want 5", got)
	}
	if got := SumMetric(text, "kpnode_peer_penalties_total", `protocol="sync"`); got != 2 {
		t.Fatalf("sync %v, want 2", got)
	}
	if got := SumMetric(text, "kpnode_missing"); got != 0 {
		t.Fatalf("missing metric %v", got)
	}
}
