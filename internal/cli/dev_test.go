package cli_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/cli"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// TestDevModeNeedsNothingInstalled runs `coordinator dev` in memory, drives a saga through it and
// produces to its embedded broker.
func TestDevModeNeedsNothingInstalled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var out, errb syncBuffer
	addrs := make(chan string, 1)
	done := make(chan int, 1)
	go func() {
		done <- cli.Main(ctx, []string{"dev", "--memory", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--kafka-listen", "127.0.0.1:0"}, cli.Env{
			Stdout: &out, Stderr: &errb, Getenv: func(string) string { return "" },
			Ready: func(addr string) { addrs <- addr },
		})
	}()
	var addr string
	select {
	case addr = <-addrs:
	case code := <-done:
		t.Fatalf("dev exited with %d: %s %s", code, out.String(), errb.String())
	case <-time.After(30 * time.Second):
		t.Fatal("dev did not start")
	}
	banner := out.String()
	require.Contains(t, banner, "single process, single node")
	require.Contains(t, banner, "no authentication")
	require.Contains(t, banner, "gRPC API        "+addr)
	require.Contains(t, banner, "Kafka broker")

	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	defer part.Stop()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	res, err := treatyv1.NewCoordinatorClient(conn).SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "dev-1", Wait: durationpb.New(10 * time.Second),
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{Name: "a",
			Action:     &treatyv1.Call{Target: part.Target("x.Y/Do")},
			Compensate: &treatyv1.Call{Target: part.Target("x.Y/Undo")}}}}})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)

	// The embedded broker takes a record on a topic created on first use.
	var broker string
	for _, line := range strings.Split(banner, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "Kafka" {
			broker = f[2]
		}
	}
	require.NotEmpty(t, broker)
	kc, err := kgo.NewClient(kgo.SeedBrokers(broker), kgo.AllowAutoTopicCreation())
	require.NoError(t, err)
	defer kc.Close()
	require.NoError(t, kc.ProduceSync(ctx, &kgo.Record{Topic: "dev-events", Value: []byte("hello")}).FirstErr())

	cancel()
	select {
	case code := <-done:
		require.Equal(t, 0, code, errb.String())
	case <-time.After(20 * time.Second):
		t.Fatal("dev did not stop")
	}
}
