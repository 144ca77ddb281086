package pgtest

import (
	"context"
	"fmt"
	"time"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// runContainer starts postgres:15 in Docker. Any failure (no engine, no image) is returned,
// never panicked, so the caller can report every source it tried.
func runContainer(ctx context.Context) (url string, stop func(), err error) {
	defer func() {
		if r := recover(); r != nil { // testcontainers may panic when no engine is found
			err = fmt.Errorf("%w: %v", errNoDocker, r)
		}
	}()
	c, err := testcontainers.Run(ctx, "postgres:15",
		testcontainers.WithEnv(map[string]string{"POSTGRES_HOST_AUTH_METHOD": "trust"}),
		testcontainers.WithExposedPorts("5432/tcp"),
		testcontainers.WithCmd("postgres", "-c", "fsync=off", "-c", "max_connections=400",
			"-c", "max_prepared_transactions=100"),
		testcontainers.WithWaitStrategy(wait.ForListeningPort("5432/tcp").WithStartupTimeout(time.Minute)),
	)
	if err != nil {
		return "", nil, err
	}
	host, err := c.Host(ctx)
	if err != nil {
		_ = c.Terminate(context.Background())
		return "", nil, err
	}
	port, err := c.MappedPort(ctx, "5432/tcp")
	if err != nil {
		_ = c.Terminate(context.Background())
		return "", nil, err
	}
	u := fmt.Sprintf("postgres://postgres@%s:%s/postgres?sslmode=disable", host, port.Port())
	stop = func() { _ = c.Terminate(context.Background()) }
	deadline := time.Now().Add(30 * time.Second)
	for ping(u) != nil {
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("container postgres never answered at %s", u)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return u, stop, nil
}
