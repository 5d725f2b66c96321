// Starts GraphiQL against the query API that served this page: queries to the element's
// data-endpoint, subscriptions to its data-subscription-endpoint (both on this origin). GraphiQL's
// fetcher sends the Headers pane's headers with every request and, for subscriptions, in
// `connection_init` (where the query API reads the token), so one
// {"Authorization": "Bearer <token>"} serves both.
(function () {
  'use strict';
  var root = document.getElementById('graphiql');
  var url = new URL(root.dataset.endpoint, window.location.href).toString();
  var subscriptionUrl = new URL(root.dataset.subscriptionEndpoint, window.location.href).toString().replace(/^http/, 'ws');

  ReactDOM.createRoot(root).render(
    React.createElement(GraphiQL, {
      fetcher: GraphiQL.createFetcher({ url: url, subscriptionUrl: subscriptionUrl }),
      defaultEditorToolsVisibility: true,
      defaultHeaders: '{"Authorization": "Bearer <a token: ./dev token USER>"}',
    })
  );
})();
