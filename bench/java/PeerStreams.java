// The peer workload in Kafka Streams, run as its own JVM by bench_peers.py
// (bench/peer_streams.py resolves the jars, compiles this file and builds
// the command line).
//
// Per-key running total in a persistent (RocksDB) key-value store with its
// changelog (logging on, the default), one output per input, exactly_once_v2,
// one stream thread, 100 ms commits, record cache off, so every update goes
// to the store and the changelog as it happens, as in the other peers.
// Runs until SIGTERM; a shutdown hook closes the client cleanly.
//
//   java -cp CLASSES:LIBS/* PeerStreams --bootstrap HOST:PORT --source T --out T
//        --group G --state-dir D [--commit-interval 0.1]

import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.processor.api.FixedKeyProcessor;
import org.apache.kafka.streams.processor.api.FixedKeyProcessorContext;
import org.apache.kafka.streams.processor.api.FixedKeyRecord;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

public final class PeerStreams {
    static final String STORE = "totals";
    static final ObjectMapper JSON = new ObjectMapper();

    /** Adds the order's amount to its key's total and forwards the order with "total". */
    static final class RunningTotal implements FixedKeyProcessor<String, String, String> {
        private FixedKeyProcessorContext<String, String> context;
        private KeyValueStore<String, Long> totals;

        @Override
        public void init(FixedKeyProcessorContext<String, String> context) {
            this.context = context;
            this.totals = context.getStateStore(STORE);
        }

        @Override
        public void process(FixedKeyRecord<String, String> record) {
            ObjectNode order;
            try {
                order = (ObjectNode) JSON.readTree(record.value());
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
            Long before = totals.get(record.key());
            long total = (before == null ? 0L : before) + order.get("amount").asLong();
            totals.put(record.key(), total);
            order.put("total", total);
            try {
                context.forward(record.withValue(JSON.writeValueAsString(order)));
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        }
    }

    /** "--name value" pairs; every name but --commit-interval is required. */
    static Map<String, String> parseArgs(String[] argv) {
        Map<String, String> args = new HashMap<>();
        args.put("commit-interval", "0.1");
        for (int i = 0; i + 1 < argv.length; i += 2) {
            if (!argv[i].startsWith("--")) {
                throw new IllegalArgumentException("expected --name value, got " + argv[i]);
            }
            args.put(argv[i].substring(2), argv[i + 1]);
        }
        for (String name : new String[] {"bootstrap", "source", "out", "group", "state-dir"}) {
            if (!args.containsKey(name)) {
                throw new IllegalArgumentException("--" + name + " is required");
            }
        }
        return args;
    }

    public static void main(String[] argv) throws InterruptedException {
        Map<String, String> args = parseArgs(argv);
        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, args.get("group"));
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, args.get("bootstrap"));
        props.put(StreamsConfig.STATE_DIR_CONFIG, args.get("state-dir"));
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG,
                  Math.round(Double.parseDouble(args.get("commit-interval")) * 1000));
        props.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, 0L);
        props.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");

        StreamsBuilder builder = new StreamsBuilder();
        builder.addStateStore(Stores.keyValueStoreBuilder(
                Stores.persistentKeyValueStore(STORE), Serdes.String(), Serdes.Long()));
        builder.stream(args.get("source"), Consumed.with(Serdes.String(), Serdes.String()))
               .processValues(RunningTotal::new, STORE)
               .to(args.get("out"), Produced.with(Serdes.String(), Serdes.String()));

        KafkaStreams streams = new KafkaStreams(builder.build(), props);
        CountDownLatch stopped = new CountDownLatch(1);
        // An error stops this client rather than replacing the thread, so a
        // broken run shows as a process that exits, not one that limps on.
        streams.setUncaughtExceptionHandler(e -> {
            System.err.println("PeerStreams: stream thread failed: " + e);
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.NOT_RUNNING) {
                stopped.countDown();
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close(Duration.ofSeconds(10));
            stopped.countDown();
        }, "peer-streams-shutdown"));
        streams.start();
        stopped.await();
        if (streams.state() == KafkaStreams.State.ERROR) {
            System.exit(1);
        }
    }
}
