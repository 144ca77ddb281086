package treatytest_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

// A user's own test of a saga against a real coordinator: start one, connect, run, check.
// (Example functions cannot take a *testing.T; in a test, t is the test's.)
func ExampleStart() {
	var t *testing.T // your test's t
	coord := treatytest.Start(t, treatytest.Options{})
	client := coord.Client(t)
	_, _ = client.Saga(context.Background(), sdk.Saga{GID: "my-trip" /* Steps: your services' calls */})
	coord.RequireSucceeded(t, client, "my-trip", 10*time.Second)
}

// NewEmbedded needs no database server at all: an in-memory store, for examples and demos.
func ExampleNewEmbedded() {
	coord, err := treatytest.NewEmbedded(context.Background())
	if err != nil {
		panic(err)
	}
	defer coord.Close()
	client, err := sdk.Dial(context.Background(), sdk.Options{Address: coord.Addr})
	if err != nil {
		panic(err)
	}
	defer client.Close()
	_, err = client.Get(context.Background(), "nothing-yet")
	fmt.Println(err != nil)
	// Output: true
}
