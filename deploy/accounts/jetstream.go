package accounts

// The JetStream API subjects a client publishes to for each kind of
// access. Replies come back to the client's inbox; push deliveries
// (watchers, object reads) to inbox subjects too.

// kvStream is the stream behind a key-value bucket.
func kvStream(bucket string) string { return "KV_" + bucket }

// objectStream is the stream behind an object store.
func objectStream(store string) string { return "OBJ_" + store }

// kvRead reads a bucket: its info, gets by key and revision (direct get),
// and with watch an ordered consumer on the bucket's subjects (flow control
// replies included).
func (j JetStream) kvRead(bucket string, watch bool) []string {
	s := kvStream(bucket)
	out := []string{
		j.api() + ".STREAM.INFO." + s,
		j.api() + ".DIRECT.GET." + s,
		j.api() + ".DIRECT.GET." + s + ".$KV." + bucket + ".>",
	}
	if watch {
		out = append(out, j.orderedConsumer(s, "$KV."+bucket+".>")...)
	}
	return out
}

// kvWrite reads and watches a bucket and writes (puts, creates, updates,
// deletes) its keys.
func (j JetStream) kvWrite(bucket string) []string {
	return append(j.kvRead(bucket, true), "$KV."+bucket+".>")
}

// objectRead reads an object store: its info, object metadata (direct get
// of the last meta message) and chunks through an ordered consumer.
func (j JetStream) objectRead(store string) []string {
	s := objectStream(store)
	return append([]string{
		j.api() + ".STREAM.INFO." + s,
		j.api() + ".DIRECT.GET." + s + ".$O." + store + ".M.>",
	}, j.orderedConsumer(s, "$O."+store+".C.>")...)
}

// orderedConsumer creates (and deletes, when it resets or stops) an
// ephemeral consumer of stream on filter; the filter is part of the
// create subject, and the server refuses a request whose body names
// another one.
func (j JetStream) orderedConsumer(stream, filter string) []string {
	return []string{
		j.api() + ".CONSUMER.CREATE." + stream + ".*." + filter,
		j.api() + ".CONSUMER.DELETE." + stream + ".*",
		// Flow control of large reads (fragments) is answered here.
		"$JS.FC." + stream + ".>",
	}
}

// streamTail reads a stream from a recent sequence on and follows it: its
// info and an ordered pull consumer on filter, whose ephemeral consumers it
// fetches from.
func (j JetStream) streamTail(stream, filter string) []string {
	return append([]string{j.api() + ".STREAM.INFO." + stream, j.api() + ".CONSUMER.MSG.NEXT." + stream + ".*"},
		j.orderedConsumer(stream, filter)...)
}

// consume manages durable consumers on stream and reads from them, as
// settlement does for USAGE and for the customers' consumers.
func (j JetStream) consume(stream string) []string {
	return []string{
		j.api() + ".STREAM.INFO." + stream,
		j.api() + ".STREAM.MSG.GET." + stream,
		j.api() + ".DIRECT.GET." + stream,
		j.api() + ".DIRECT.GET." + stream + ".>",
		j.api() + ".CONSUMER.*." + stream + ".>",
		j.api() + ".CONSUMER.DURABLE.CREATE." + stream + ".*",
		j.api() + ".CONSUMER.MSG.NEXT." + stream + ".*",
		j.api() + ".CONSUMER.NAMES." + stream,
		j.api() + ".CONSUMER.LIST." + stream,
		"$JS.ACK." + stream + ".>",
		"$JS.ACK.*.*." + stream + ".>",
		"$JS.FC." + stream + ".>",
	}
}

// pull reads from one existing durable pull consumer: its info, fetches
// and acknowledgements (short and domain-qualified forms), and nothing
// else; in particular it cannot create consumers, whose configuration may
// push deliveries to any subject.
func (j JetStream) pull(stream, consumer string) []string {
	return []string{
		j.api() + ".CONSUMER.INFO." + stream + "." + consumer,
		j.api() + ".CONSUMER.MSG.NEXT." + stream + "." + consumer,
		"$JS.ACK." + stream + "." + consumer + ".>",
		"$JS.ACK.*.*." + stream + "." + consumer + ".>",
	}
}
