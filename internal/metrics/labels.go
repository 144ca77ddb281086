package metrics

import (
	"strings"
	"sync"
)

// MaxTargetLabels bounds the values of the target label (participant endpoints, host:port): a
// client chooses targets, and every distinct label value is a time series kept for the life of
// the process and sent on every scrape. Endpoints seen after the first MaxTargetLabels share
// the value OverflowTarget.
const MaxTargetLabels = 100

// OverflowTarget is the target label of endpoints past MaxTargetLabels.
const OverflowTarget = "other"

// targetLabels is the capped set of target label values: the first max endpoints seen keep their
// own value for the life of the process, later ones are OverflowTarget.
type targetLabels struct {
	max  int
	mu   sync.Mutex
	seen map[string]struct{}
}

func newTargetLabels(max int) *targetLabels {
	return &targetLabels{max: max, seen: make(map[string]struct{}, max)}
}

// label returns the label of a call target as the engine names it ("host:port[,host:port]" with
// or without "/package.Service/Method"): its endpoint, the method dropped, from the capped set.
func (l *targetLabels) label(target string) string {
	endpoint, _, _ := strings.Cut(target, "/")
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.seen[endpoint]; ok {
		return endpoint
	}
	if len(l.seen) >= l.max {
		return OverflowTarget
	}
	l.seen[endpoint] = struct{}{}
	return endpoint
}
