//! The enqueue path against a real SQS API: the row is committed before the message is sent,
//! and delivery trouble never loses an accepted job.

use shared::queue::Dispatcher;
use uuid::Uuid;

use crate::support::*;

const CHARACTER: &str = r#"{"characterId":"6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b"}"#;

#[tokio::test]
async fn the_message_names_a_job_whose_row_is_already_committed() {
    let queue = TestQueue::new().await;
    let t = TestApp::sqs(&queue).await;
    let alice = user("alice", None);
    let (status, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&alice),
            Some(CHARACTER),
        ),
    )
    .await;
    assert_eq!(status, 202);
    let messages = queue.receive().await;
    assert_eq!(messages.len(), 1);
    let sent: serde_json::Value = serde_json::from_str(messages[0].body().unwrap()).unwrap();
    assert_eq!(sent, serde_json::json!({ "jobId": body["jobId"] }));
    // A separate connection sees the row: it was committed, not merely written.
    let (client, conn) = tokio_postgres::connect(&t.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
    let row = client
        .query_one(
            "SELECT status::text FROM generation_jobs WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "queued");
}

#[tokio::test]
async fn when_the_database_refuses_the_job_no_message_is_sent() {
    let queue = TestQueue::new().await;
    let t = TestApp::sqs(&queue).await;
    let broken = shared::App::new(
        config(
            "postgres://postgres@127.0.0.1:5432/mj_no_such_database",
            t.media.path(),
        ),
        shared::db::pool("postgres://postgres@127.0.0.1:5432/mj_no_such_database", 1).unwrap(),
        Dispatcher::sqs(queue.client.clone(), queue.url.clone()),
        t.generator.clone(),
    );
    let (status, body) = call(
        &broken,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&user("alice", None)),
            Some(CHARACTER),
        ),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(queue.receive().await.is_empty());
}

#[tokio::test]
async fn when_sqs_is_unreachable_the_accepted_job_keeps_its_id_and_stays_queued() {
    let t = TestApp::with(
        |_| {
            Dispatcher::sqs(
                sqs_client_for("http://127.0.0.1:9"),
                "http://127.0.0.1:9/123456789012/nowhere".into(),
            )
        },
        std::time::Duration::ZERO,
    )
    .await;
    let (status, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&user("alice", None)),
            Some(CHARACTER),
        ),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
    assert_eq!(t.status_of(id).await, "queued");
}

#[tokio::test]
async fn a_job_goes_from_enqueue_through_sqs_to_completed_and_its_message_is_deleted() {
    let queue = TestQueue::new().await;
    let t = TestApp::sqs(&queue).await;
    let alice = user("alice", None);
    let (_, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&alice),
            Some(CHARACTER),
        ),
    )
    .await;
    let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();

    let received = shared::worker::poll_sqs_once(
        &t.app,
        &queue.client,
        &queue.url,
        std::time::Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(received, 1);
    assert_eq!(t.status_of(id).await, "completed");
    assert_eq!(
        queue.depth().await,
        (0, 0, 0),
        "the handled message is deleted"
    );
    assert_eq!(t.generator.calls_for(id), 1);
}

#[tokio::test]
async fn a_retryable_failure_requeues_the_job_and_sends_a_delayed_message() {
    let queue = TestQueue::new().await;
    let t = TestApp::sqs(&queue).await;
    let alice = user("alice", None);
    let id = Uuid::now_v7();
    t.insert_job(id, &alice, "simulate:retryable").await;
    let event = batch(vec![sqs_record("m-1", &job_message(id))]);
    let response = shared::worker::handle_sqs(&t.app, event).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "the retry is scheduled, not a batch failure"
    );
    let row = t.job_row(id).await;
    assert_eq!(row.get::<_, String>("status"), "queued");
    assert_eq!(row.get::<_, i32>("attempts"), 1);
    assert!(row
        .get::<_, Option<String>>("error_message")
        .unwrap()
        .contains("simulated provider overload"));
    let (visible, _, delayed) = queue.depth().await;
    assert_eq!(visible + delayed, 1, "one message carries the retry");
}

#[tokio::test]
async fn every_message_delivered_three_times_still_runs_each_job_once() {
    let queue = TestQueue::new().await;
    let t = TestApp::configured(
        {
            let (client, url) = (queue.client.clone(), queue.url.clone());
            move |_| Dispatcher::sqs(client, url)
        },
        std::time::Duration::from_millis(50),
        &[("MAX_CONCURRENT_JOBS", "20")],
    )
    .await;
    let alice = user("alice", None);
    let mut ids = Vec::new();
    for _ in 0..10 {
        let (_, body) = call(
            &t.app,
            api_request(
                "POST",
                "/api/generate/character",
                Some(&alice),
                Some(CHARACTER),
            ),
        )
        .await;
        let id: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();
        // Two more copies of the message enqueue already sent.
        for _ in 0..2 {
            queue.send(id).await;
        }
        ids.push(id);
    }
    let mut handled = 0;
    for _ in 0..20 {
        let received = shared::worker::poll_sqs_once(
            &t.app,
            &queue.client,
            &queue.url,
            std::time::Duration::from_secs(1),
        )
        .await
        .unwrap();
        handled += received;
        if received == 0 {
            break;
        }
    }
    assert_eq!(handled, 30);
    for id in ids {
        assert_eq!(t.generator.calls_for(id), 1, "job {id}");
        assert_eq!(t.status_of(id).await, "completed");
    }
    assert_eq!(queue.depth().await, (0, 0, 0));
}

#[tokio::test]
async fn a_poison_message_goes_to_the_dlq_after_max_receive_count_without_holding_up_others() {
    let queue = TestQueue::new().await;
    let dlq = queue
        .client
        .create_queue()
        .queue_name(format!("dlq-{}", Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap();
    let dlq_url = dlq.queue_url.unwrap();
    let dlq_arn = queue
        .client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    queue
        .client
        .set_queue_attributes()
        .queue_url(&queue.url)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
            serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2 }).to_string(),
        )
        .send()
        .await
        .unwrap();
    let t = TestApp::sqs(&queue).await;
    queue
        .client
        .send_message()
        .queue_url(&queue.url)
        .message_body("{\"jobId\": 42")
        .send()
        .await
        .unwrap();
    let (_, body) = call(
        &t.app,
        api_request(
            "POST",
            "/api/generate/character",
            Some(&user("alice", None)),
            Some(CHARACTER),
        ),
    )
    .await;
    let good: Uuid = body["jobId"].as_str().unwrap().parse().unwrap();

    // The good job runs at once; the poison one is only hidden for a few seconds each time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let dead = loop {
        shared::worker::poll_sqs_once(
            &t.app,
            &queue.client,
            &queue.url,
            std::time::Duration::from_secs(1),
        )
        .await
        .unwrap();
        let in_dlq = queue
            .client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages]
            .parse::<i64>()
            .unwrap();
        if in_dlq > 0 || std::time::Instant::now() > deadline {
            break in_dlq;
        }
    };
    assert_eq!(t.status_of(good).await, "completed");
    assert_eq!(dead, 1, "the poison message is dead-lettered");
    assert_eq!(queue.depth().await, (0, 0, 0));
}
