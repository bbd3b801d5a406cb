// A stock grpc-go client for the integration tests (tests/tests/stock_clients.rs):
// dials the agent with nothing but the target and insecure credentials, lists
// the services through server reflection, and calls ServerStatus with the
// request and response left as raw protobuf bytes (no generated code).
//
//	stock_client unix:///path/to.sock
//
// Prints the services one a line, then "status-bytes N". Exit status 1 on
// any RPC error, with the error on stderr.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	rpb "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
)

// rawCodec passes protobuf bytes through unchanged.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s failed: %v\n", what, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: stock_client unix:///path/to.sock")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, os.Args[1], grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail("dial", err)
	}
	defer conn.Close()

	stream, err := rpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		fail("server reflection", err)
	}
	req := &rpb.ServerReflectionRequest{
		MessageRequest: &rpb.ServerReflectionRequest_ListServices{ListServices: "*"},
	}
	if err := stream.Send(req); err != nil {
		fail("server reflection send", err)
	}
	resp, err := stream.Recv()
	if err != nil {
		fail("server reflection", err)
	}
	for _, s := range resp.GetListServicesResponse().GetService() {
		fmt.Println(s.GetName())
	}
	stream.CloseSend()

	in, out := []byte{}, []byte{}
	err = conn.Invoke(ctx, "/flowaudit.v1.FlowAudit/ServerStatus", &in, &out, grpc.ForceCodec(rawCodec{}))
	if err != nil {
		fail("ServerStatus", err)
	}
	fmt.Printf("status-bytes %d\n", len(out))
}
