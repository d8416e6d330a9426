package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry/telemetrytest"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// A dead letter lands in stream DEADLETTER with its reason and is counted
// by service and reason; a reason that is not a subject token becomes
// "invalid".
func TestDeadLetterStoredAndCounted(t *testing.T) {
	rec := telemetrytest.Install(t)
	s := bustest.Server(t)
	c := bustest.Connect(t, s, "svc")
	ctx := context.Background()
	msg := &nats.Msg{Subject: "tessera.some.subject", Data: []byte("garbage"), Header: nats.Header{"X": {"y"}}}
	for i, reason := range []string{"bad_thing", "not a token"} {
		if err := bus.DeadLetter(ctx, c.JS, "router", reason, errors.New("cannot decode"), msg, uint64(7+i)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := c.JS.Stream(ctx, subjects.StreamDeadLetter)
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.GetLastMsgForSubject(ctx, subjects.DeadLetter("router", "bad_thing"))
	if err != nil {
		t.Fatal(err)
	}
	var dl wire.DeadLetter
	if err := json.Unmarshal(m.Data, &dl); err != nil {
		t.Fatal(err)
	}
	if dl.Service != "router" || dl.Reason != "bad_thing" || dl.Error != "cannot decode" || dl.Subject != msg.Subject || string(dl.Data) != "garbage" || dl.StreamSeq != 7 {
		t.Fatalf("dead letter %+v", dl)
	}
	// The same stream message again (a consumer that crashed before its
	// acknowledgement) leaves one letter.
	if err := bus.DeadLetter(ctx, c.JS, "router", "bad_thing", errors.New("cannot decode"), msg, 7); err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 2 {
		t.Fatalf("%d dead letters for two stream messages, want 2", info.State.Msgs)
	}
	metrics := rec.Metrics(t)
	got, ok := metrics[bus.DeadLetterMetric]
	if !ok {
		t.Fatalf("no %s among %s", bus.DeadLetterMetric, telemetrytest.Names(metrics))
	}
	for reason, want := range map[string]float64{"bad_thing": 1, "invalid": 1} {
		if v, _ := telemetrytest.Value(got, "service=router", "reason="+reason); v != want {
			t.Errorf("%s{reason=%s} = %v, want %v", bus.DeadLetterMetric, reason, v, want)
		}
	}
}
